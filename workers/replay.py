"""Replays a traffic trace on one engine, real or simulated, and records what each request saw.

Requests arrive at their trace times (on the wall clock for the real engine, on the
simulator's virtual clock for `SimulatedEngine`); admission, when given, refuses those whose
predicted time to first token misses the SLO, as a worker does. A request generates greedily
(EOS ignored) and is ended once it has its trace's `output_tokens`: its `max_tokens` is one
limit for the whole trace, as clients set, so nothing in the engine knows a request's true
length in advance. Prompts are token ids only: a group's requests share the same leading
`prefix_tokens` ids, the rest is drawn per request.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from kvstore.messages import RequestDelta
from kvstore.sampling_params import SamplingParams
from kvstore.trace import TraceRequest
from workers.admission import AdmissionControl
from workers.scheduler import Scheduler


class ReplayEngine(Protocol):
    def add_request(
        self, prompt: list[int], params: SamplingParams, request_id: str | None, priority: int
    ) -> object: ...
    def abort_request(self, request_id: str) -> bool: ...
    def has_unfinished(self) -> bool: ...
    def step(self) -> list[RequestDelta]: ...

    scheduler: Scheduler
    last_step: tuple | None  # (StepFeatures, seconds) of the last step


@dataclass(slots=True)
class RequestRecord:
    arrival_s: float
    prompt_tokens: int
    output_tokens: int  # what the trace asks for
    rejected: bool = False
    first_token_s: float | None = None
    finish_s: float | None = None
    generated: int = 0
    last_token_s: float = 0.0
    gaps_s: list[float] = field(default_factory=list)  # between consecutive tokens

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def e2e_s(self) -> float | None:
        return None if self.finish_s is None else self.finish_s - self.arrival_s

    @property
    def mean_itl_s(self) -> float:
        return sum(self.gaps_s) / len(self.gaps_s) if self.gaps_s else 0.0


@dataclass(slots=True)
class TimelinePoint:
    t: float
    num_waiting: int
    batch_seqs: int  # in the last step


@dataclass(slots=True)
class ReplayResult:
    records: list[RequestRecord]
    timeline: list[TimelinePoint]
    busy_s: float  # machine-seconds: CPU time of this process (real) or summed step costs (sim)
    # (StepFeatures, seconds from the loop's turn to the step's end) of every step
    steps: list = field(default_factory=list)


class WallClock:
    def __init__(self) -> None:
        self._start = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self._start

    def wait_until(self, t: float) -> None:
        time.sleep(max(0.0, t - self.now()))


class VirtualClock:
    """The simulator's clock: waiting for the next arrival is a jump."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def now(self) -> float:
        return self.engine.now

    def wait_until(self, t: float) -> None:
        self.engine.now = max(self.engine.now, t)


def prompt_token_ids(request: TraceRequest, index: int, vocab_size: int, seed: int) -> list[int]:
    """A group's shared prefix (the same ids in every process: seeded from a digest of the
    group's name, never Python's hash) followed by ids of this request's own."""
    ids: list[int] = []
    if request.prefix_group is not None and request.prefix_tokens:
        digest = hashlib.blake2b(request.prefix_group.encode(), digest_size=8).digest()
        group_rng = np.random.default_rng([seed, int.from_bytes(digest, "little")])
        ids = group_rng.integers(0, vocab_size, request.prefix_tokens).tolist()
    rest = request.prompt_tokens - len(ids)
    ids += np.random.default_rng([seed, 1 << 32, index]).integers(0, vocab_size, rest).tolist()
    return ids


def replay(
    trace: list[TraceRequest],
    engine: ReplayEngine,
    clock: WallClock | VirtualClock,
    vocab_size: int,
    admission: AdmissionControl | None = None,
    max_tokens: int | None = None,
    seed: int = 0,
) -> ReplayResult:
    """Runs `trace` (sorted by arrival) to the end; every request is answered or refused."""
    limit = max_tokens or max(r.output_tokens for r in trace)
    params = SamplingParams(max_tokens=limit, temperature=0.0, ignore_eos=True)
    records: dict[str, RequestRecord] = {}
    timeline: list[TimelinePoint] = []
    steps: list = []
    scheduler = engine.scheduler
    cpu_start = time.process_time()
    next_index = 0
    while True:
        now = clock.now()
        while next_index < len(trace) and trace[next_index].arrival_s <= now:
            request = trace[next_index]
            rid = f"r{next_index}"
            record = records[rid] = RequestRecord(
                request.arrival_s, request.prompt_tokens, request.output_tokens
            )
            ids = prompt_token_ids(request, next_index, vocab_size, seed)
            if admission is not None:
                policy, waited = scheduler.policy, now - request.arrival_s
                slack, cap = policy.admission_slack(), policy.sequence_cap()
                if admission.check(len(ids), scheduler.num_running, waited, slack, cap):
                    record.rejected = True
                    next_index += 1
                    continue
                admission.admitted(len(ids), limit)
            engine.add_request(ids, params, rid, request.priority)
            next_index += 1
        if not engine.has_unfinished():
            if next_index == len(trace):
                break
            clock.wait_until(trace[next_index].arrival_s)
            continue
        before, started = engine.last_step, now
        deltas = engine.step()
        now = clock.now()
        for delta in deltas:
            _take(records[delta.request_id], delta, now, engine, admission)
        if engine.last_step is not before:  # a step ran (not one that found nothing to do)
            step = engine.last_step[0]
            # From this iteration's start to the step's end: arrivals and the step's own
            # bookkeeping included, what the simulator's step cost must stand for.
            steps.append((step, clock.now() - started))
            timeline.append(TimelinePoint(now, scheduler.num_waiting, step.num_seqs))
    busy = getattr(engine, "busy_s", None)
    if busy is None:
        busy = time.process_time() - cpu_start
    return ReplayResult(list(records.values()), timeline, busy, steps)


def _take(record: RequestRecord, delta: RequestDelta, now: float, engine, admission) -> None:
    """One step's tokens for a request: the first token's time, the gaps, and its end once it
    has the tokens its trace line asks for."""
    num = len(delta.new_token_ids)
    if not num or record.finish_s is not None:
        return
    if record.first_token_s is None:
        record.first_token_s = now
        if admission is not None:
            admission.started(record.prompt_tokens)
    else:
        record.gaps_s.extend([(now - record.last_token_s) / num] * num)
    record.last_token_s = now
    record.generated += len(delta.new_token_ids)
    if record.generated >= record.output_tokens or delta.finished:
        record.finish_s = now
        if not delta.finished:
            engine.abort_request(delta.request_id)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else 0.0


def summarize(result: ReplayResult, slo_ttft_s: float, slo_itl_s: float) -> dict[str, float]:
    """The scheduling benchmark's figures. Goodput: requests per second of the trace that met
    both SLOs (time to first token, and mean time per output token after it); refused and
    late requests count against it alike."""
    records = result.records
    done = [r for r in records if r.finish_s is not None]
    good = [r for r in done if r.ttft_s <= slo_ttft_s and r.mean_itl_s <= slo_itl_s]
    span = max((r.arrival_s for r in records), default=0.0) or 1.0
    makespan = max([r.finish_s for r in done] + [span])
    tokens = sum(r.generated for r in done)
    ttfts = [r.ttft_s for r in done]
    e2es = [r.e2e_s for r in done]
    gaps = [g for r in done for g in r.gaps_s]
    return {
        "requests": len(records),
        "completed": len(done),
        "rejected": sum(r.rejected for r in records),
        "good": len(good),
        "goodput_rps": len(good) / span,
        "throughput_tok_s": tokens / makespan,
        "ttft_mean_s": float(np.mean(ttfts)) if ttfts else 0.0,
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p99_s": percentile(ttfts, 99),
        "itl_p99_s": percentile(gaps, 99),
        "e2e_mean_s": float(np.mean(e2es)) if e2es else 0.0,
        "e2e_p50_s": percentile(e2es, 50),
        "e2e_p99_s": percentile(e2es, 99),
        "cpu_s_per_mtok": result.busy_s / tokens * 1e6 if tokens else 0.0,
    }
