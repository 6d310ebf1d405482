"""The learned batching policy: its parameters file, the forecast, the budget within limits,
a queue order that never starves a request, the fallback, and the same greedy text."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.sampling_params import SamplingParams
from kvstore.trace import TraceRequest
from workers import Engine, EngineConfig
from workers.admission import AdmissionControl
from workers.batching_policy import AdaptiveBatchingPolicy, QueueSnapshot, StepTimeModel
from workers.learned_policy import (
    DEFAULT_PARAMS_PATH,
    LearnedBatchingPolicy,
    LearnedParams,
    RateForecaster,
)
from workers.policy_search import policy_cost, train
from workers.request import Request
from workers.simulator import SimSettings, simulate
from workers.step_cost import StepCostModel, StepFeatures

COST = StepCostModel(a=2e-3, b_prefill=5e-5, c_decode=1e-4, d_context=1e-7, e_seqs=1e-4)


def policy(**params) -> LearnedBatchingPolicy:
    return LearnedBatchingPolicy(2048, 64, StepTimeModel(), LearnedParams(**params))


def test_parameters_round_trip_and_bad_ones_are_refused(tmp_path):
    assert isinstance(LearnedParams.load(), LearnedParams)
    assert LearnedParams.load(DEFAULT_PARAMS_PATH) == LearnedParams.load()
    params = LearnedParams(latency_weight=2.5, admit_slack=0.8)
    params.save(tmp_path / "p.json", trained_on="test")
    assert LearnedParams.load(tmp_path / "p.json") == params
    (tmp_path / "bad.json").write_text(json.dumps({"params": {"surprise": 1.0}}))
    with pytest.raises(ValueError, match="surprise"):
        LearnedParams.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="horizon_s"):
        LearnedParams(horizon_s=-1.0)
    with pytest.raises(ValueError, match="tau"):
        LearnedParams(short_tau_s=5.0, long_tau_s=1.0)


def test_the_forecaster_sees_a_surge_building():
    forecast = RateForecaster(0.5, 10.0)
    arrivals = 0
    for step in range(400):  # 40 s at 10 requests/s
        arrivals += 1
        forecast.update(step * 0.1, arrivals, arrivals * 100)
    assert forecast.surge == pytest.approx(1.0, abs=0.15)
    assert forecast.rates[1] == pytest.approx(10.0, rel=0.1)
    for step in range(10):  # one second at 80 requests/s
        arrivals += 8
        forecast.update(40.0 + step * 0.1, arrivals, arrivals * 100)
    assert forecast.surge > 3.0
    extra_requests, extra_tokens = forecast.excess(1.0)
    assert extra_requests > 20 and extra_tokens == pytest.approx(100 * extra_requests)


def test_the_budget_rises_before_the_queue_does():
    """With the same queue, a policy that has seen a surge start prefills in larger chunks."""
    calm, surging = policy(surge_gain=1.0), policy(surge_gain=1.0)
    queue = dict(num_running=32, num_waiting=1, num_waiting_tokens=100, num_free_blocks=500)
    for step in range(100):
        calm.limits(QueueSnapshot(**queue, now=step * 0.1, num_arrivals=step))
        surging.limits(QueueSnapshot(**queue, now=step * 0.1, num_arrivals=step))
    calm_budget = calm.limits(QueueSnapshot(**queue, now=10.0, num_arrivals=101))
    surge_budget = surging.limits(QueueSnapshot(**queue, now=10.0, num_arrivals=140))
    assert surge_budget.max_num_batched_tokens > calm_budget.max_num_batched_tokens


@settings(max_examples=300, deadline=None)
@given(
    st.integers(0, 64),
    st.integers(0, 500),
    st.integers(0, 10**6),
    st.integers(0, 10**6),
    st.floats(0, 1e4),
    st.integers(0, 10**5),
    st.floats(0.01, 20),
    st.floats(0, 4),
    st.floats(0, 3),
    st.floats(0, 2),
    st.sampled_from([None, 1e-4, 0.025, 1.0]),
)
def test_limits_stay_within_the_engines(
    running, waiting, tokens, context, now, arrivals, weight, gain, step_f, seq_f, slo_itl
):
    p = policy(latency_weight=weight, surge_gain=gain, step_slo_factor=step_f,
               seq_slo_factor=seq_f)  # fmt: skip
    p.set_targets(1.0, slo_itl)
    p.cost.model = COST  # a fitted cost with attention in it, as after a few steps
    for t in (now, now + 0.5):
        queue = QueueSnapshot(running, waiting, tokens, 100, context, t, arrivals, arrivals * 50)
        limits = p.limits(queue)
        assert 1 <= limits.max_num_batched_tokens <= 2048
        assert 1 <= limits.max_num_seqs <= 64


def test_short_work_goes_first_but_no_request_is_passed_for_long():
    p = policy(length_weight=4.0, max_delay_s=0.5)
    brief = SamplingParams(max_tokens=8)
    long = Request("long", list(range(1500)), SamplingParams(max_tokens=64), 10.0, arrival_order=0)
    short = Request("short", list(range(20)), brief, arrival_time=10.1, arrival_order=1)
    much_later = Request("later", list(range(20)), brief, arrival_time=10.6, arrival_order=2)
    assert p.waiting_key(short) < p.waiting_key(long)  # shortest predicted work first
    assert p.waiting_key(long) < p.waiting_key(much_later)  # but at most max_delay_s


def test_an_adversarial_stream_of_short_requests_starves_no_long_one():
    """A long prompt arrives into a queue that short requests keep full (faster than the worker
    drains them): no request that arrived more than max_delay_s after it is served before it.
    Without the bound (a delay cap of 100 s), the short ones pass it for seconds."""
    shorts = [TraceRequest(0.001 * i, 30, 16) for i in range(4000)]
    trace = sorted([TraceRequest(1.0, 1500, 8), *shorts], key=lambda r: r.arrival_s)
    index = next(i for i, r in enumerate(trace) if r.prompt_tokens == 1500)
    settings = SimSettings(num_blocks=4096, slo_ttft_s=1e9, slo_itl_s=1e9)

    def passed_by(max_delay_s: float) -> int:
        params = LearnedParams(length_weight=40.0, max_delay_s=max_delay_s)
        records = simulate(trace, "learned", COST, settings, learned=params).records
        long = records[index]
        assert long.generated == 8
        return sum(
            r.arrival_s > 1.0 + 0.5 and r.first_token_s < long.first_token_s for r in records
        )

    assert passed_by(0.5) == 0
    assert passed_by(100.0) > 100


def test_bad_predictions_fall_back_to_the_adaptive_policy_and_recover():
    p = policy(max_step_error=0.5)
    rng = np.random.default_rng(0)
    shapes = rng.integers([0, 0, 0, 1], [500, 64, 100_000, 64], size=(1000, 4))
    steps = [StepFeatures(*map(int, shape)) for shape in shapes]
    for step in steps[:50]:  # step times 5x off one way or the other, at random
        p.observe(step, COST.seconds(step) * float(rng.choice([0.2, 5.0])))
    assert p.falling_back and p.describe()["fallback"] == 1.0
    queue = QueueSnapshot(8, 4, 4000, 100, now=1.0, num_arrivals=12)
    adaptive = AdaptiveBatchingPolicy(2048, 64, StepTimeModel(), p.params.latency_weight)
    assert p.limits(queue) == adaptive.limits(queue)
    request = Request("r", [1, 2, 3], SamplingParams(), 0.0, arrival_order=3)
    assert p.waiting_key(request) == request.sort_key()
    for step in steps:  # steps that follow a cost model: its own fit finds it again
        p.observe(step, COST.seconds(step))
    assert not p.falling_back
    assert p.cost.model.b_prefill == pytest.approx(COST.b_prefill, rel=0.05)


def test_admission_tightens_while_a_surge_builds():
    p = policy(admit_slack=1.0, surge_admit=1.0)
    for step in range(100):
        p.limits(QueueSnapshot(4, 0, 0, 100, now=step * 0.1, num_arrivals=step))
    steady = p.admission_slack()
    p.limits(QueueSnapshot(4, 0, 0, 100, now=10.05, num_arrivals=160))
    assert p.admission_slack() < steady
    control = AdmissionControl(1.0, 2048, StepTimeModel(overhead=0.1, per_token=1e-3), 64)
    control.admitted(300, 16)
    assert control.check(300, 4, 0.0, slack=1.0) is None  # 0.1 s + 604 tokens x 1 ms
    assert control.check(300, 4, 0.0, slack=0.3) is not None


def test_the_learned_policy_never_changes_a_greedy_output(tiny_model):
    prompts = [list(range(1, 1 + n)) for n in (5, 40, 3, 90, 17, 60)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    outputs = {}
    for batching in ("fixed", "learned"):
        engine = Engine(
            EngineConfig(
                model=tiny_model,
                num_blocks=128,
                batching=batching,
                max_num_batched_tokens=64,
                max_num_seqs=4,
            )
        )
        requests = [engine.add_request(p, params) for p in prompts]
        while engine.has_unfinished():
            engine.step()
        outputs[batching] = [r.output_token_ids for r in requests]
        assert engine.kv.num_free_blocks == 128
    assert outputs["learned"] == outputs["fixed"]


def test_training_never_returns_worse_than_it_started():
    trace = [TraceRequest(0.02 * i, 50 + (i * 37) % 400, 4 + (i * 13) % 40) for i in range(400)]
    trace += [TraceRequest(3.0 + 0.002 * i, 200, 8) for i in range(300)]  # a surge
    trace.sort(key=lambda r: r.arrival_s)
    settings = SimSettings(num_blocks=2048, slo_ttft_s=0.3, slo_itl_s=0.02)
    start = LearnedParams()
    start_cost = policy_cost(start, [trace], COST, settings)
    best, best_cost = train([trace], COST, settings, rounds=2, population=4, elite=2, seed=3)
    assert best_cost <= start_cost
    assert best_cost == pytest.approx(policy_cost(best, [trace], COST, settings))
    again, again_cost = train([trace], COST, settings, rounds=2, population=4, elite=2, seed=3)
    assert (again, again_cost) == (best, best_cost)  # deterministic for a seed
    with pytest.raises(ValueError, match="trace"):
        train([], COST, settings)
