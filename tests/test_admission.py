"""Admission by predicted time to first token: the arithmetic, and a worker under a flood that
sheds what would miss the SLO, finishes what it admitted and returns to an empty backlog."""

from __future__ import annotations

import asyncio
import time

import pytest

from kvstore.index import InMemoryPrefixIndex
from kvstore.messages import GenerateRequest, WorkerOverloadedError
from kvstore.sampling_params import SamplingParams
from kvstore.worker_reports import WorkerReports
from workers.admission import AdmissionControl, predicted_ttft
from workers.batching_policy import StepTimeModel
from workers.deployment import Worker
from workers.engine import EngineConfig


def model(overhead: float = 0.01, per_token: float = 1e-3) -> StepTimeModel:
    return StepTimeModel(overhead=overhead, per_token=per_token)


def test_prediction_counts_prefill_steps_beside_the_decodes():
    # 1,000 tokens in steps of 256 - 56 decoding = 200: 5 steps of 256 tokens each.
    assert predicted_ttft(1000, 56, 256, model()) == pytest.approx(5 * (0.01 + 0.256))
    assert predicted_ttft(10, 0, 256, model()) == pytest.approx(0.01 + 0.010)


def test_refuses_only_what_would_miss_the_slo_and_never_a_request_alone():
    control = AdmissionControl(0.5, 256, model())
    assert control.check(100_000, num_running=0) is None  # nothing ahead: always admitted
    control.admitted(1000)  # about 1.3 s of prefill ahead
    refusal = control.check(10, num_running=0)
    assert refusal is not None and "first token" in refusal.reason
    assert refusal.retry_after_s == pytest.approx(predicted_ttft(1000, 0, 256, model()) - 0.5 + 0.1)
    assert control.num_refused == 1
    control.started(1000)
    assert control.check(10, num_running=0) is None
    assert AdmissionControl(None, 256, model()).check(10**6, 0) is None  # shedding off


def test_full_slots_and_time_already_waited_count_toward_the_slo():
    control = AdmissionControl(0.5, 256, model(), max_num_seqs=4)
    for _ in range(4):
        control.admitted(10, max_tokens=100)  # the first sets the mean decode: no ramp from 0
    assert control.mean_output_tokens == 100
    # 4 slots, all 4 requests ahead still queued: a fifth waits a round of decodes.
    refusal = control.check(10, num_running=0)
    assert refusal is not None and "first token" in refusal.reason
    for _ in range(4):
        control.started(10)
    assert control.check(10, num_running=2) is None  # free slots, nothing queued
    assert control.check(10, num_running=4) is not None  # every slot decoding: a round to wait
    assert control.check(10, num_running=0, waited_s=0.2) is None
    control.admitted(10, max_tokens=1)
    assert control.check(10, num_running=0, waited_s=0.6) is not None  # already late


def test_a_policys_lower_sequence_cap_counts_as_full_slots():
    """The learned policy may cap the decode batch below max_num_seqs: admission then plans
    for the slots the policy will really give."""
    control = AdmissionControl(0.5, 256, model(), max_num_seqs=64)
    control.admitted(10, max_tokens=100)
    assert control.check(10, num_running=2) is None
    refusal = control.check(10, num_running=2, seq_cap=2)  # every slot the policy allows is taken
    assert refusal is not None and "first token" in refusal.reason
    assert control.check(10, num_running=2, seq_cap=200) is None  # never above max_num_seqs


def test_an_inter_token_slo_caps_the_decode_batch():
    control = AdmissionControl(None, 256, model(overhead=0.01, per_token=1e-3), 64, 0.014)
    assert control.check(10, num_running=0) is None  # alone: always
    assert control.check(10, num_running=3) is None  # a batch of 4: 14 ms per step
    refusal = control.check(10, num_running=4)  # a batch of 5: 15 ms
    assert refusal is not None and "per token" in refusal.reason and refusal.retry_after_s > 0
    control.admitted(10, max_tokens=8)
    assert control.check(10, num_running=3) is not None  # the queued one counts too
    assert control.num_refused == 2


@pytest.mark.parametrize("batching", ["adaptive", "learned"])
def test_a_flooded_worker_sheds_with_retry_after_and_drains(tiny_model, batching):
    async def main():
        config = EngineConfig(model=tiny_model, num_blocks=256, max_num_seqs=8, batching=batching)
        worker = Worker(config, "w", InMemoryPrefixIndex(), WorkerReports(), "ns", slo_ttft_s=0.05)
        params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)

        async def one(i: int):
            prompt = [(i * 7 + t) % 900 + 5 for t in range(600)]
            request = GenerateRequest(f"r{i}", prompt, params, arrival_s=time.time())
            try:
                return [d async for d in worker.generate(request)]
            except WorkerOverloadedError as error:
                return error

        try:
            results = await asyncio.gather(*(one(i) for i in range(30)))
            # The engine thread frees a finished request's blocks just after its last delta.
            for _ in range(100):
                stats = worker.engine.stats()
                if stats["num_free_blocks"] == stats["num_blocks"]:
                    break
                await asyncio.sleep(0.02)
            return results, worker.admission.queued_tokens, worker.stats()
        finally:
            await worker.close()

    results, queued, stats = asyncio.run(main())
    refused = [r for r in results if isinstance(r, WorkerOverloadedError)]
    served = [r for r in results if not isinstance(r, WorkerOverloadedError)]
    assert refused and served
    assert all(error.args[1] > 0 for error in refused)  # a wait the client can honour
    assert all(sum(len(d.new_token_ids) for d in deltas) == 4 for deltas in served)
    assert queued == 0
    assert stats["num_free_blocks"] == stats["num_blocks"]
    assert stats["num_requests_shed"] == len(refused)  # what /metrics reports as shed
