"""One worker's scheduling without its model: the real `Scheduler`, `KVCacheManager`, `BlockPool`
and batching policy on a virtual clock, each step costing what a step-cost model says.

`SimulatedEngine` has the face of `workers.engine.Engine` that a trace replay uses (add, step,
abort), so the same replay drives both and the simulator's error against the real engine is
measured on the same trace. Each step advances `now` by its predicted cost; every request that
reaches the end of its prompt gets one token (a fixed id: no model, no text).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

from kvstore.messages import RequestDelta
from kvstore.sampling_params import SamplingParams
from kvstore.trace import TraceRequest
from workers.admission import AdmissionControl
from workers.batching_policy import BatchingPolicy, StepTimeModel
from workers.block_pool import BlockPool
from workers.kv_cache import KVCacheManager
from workers.learned_policy import LearnedParams
from workers.policy_factory import make_batching_policy
from workers.replay import ReplayResult, VirtualClock, replay
from workers.request import Request
from workers.scheduler import Scheduler, SchedulerConfig
from workers.step_cost import StepCost, StepFeatures, step_features

SIMULATED_TOKEN = 1  # what every simulated step "samples"

PolicyFactory = Callable[[StepTimeModel], BatchingPolicy]


class SimulatedEngine:
    def __init__(
        self,
        cost: StepCost,
        policy: PolicyFactory,
        num_blocks: int,
        block_size: int = 16,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        max_model_len: int = 4096,
        enable_prefix_caching: bool = True,
        hash_key: bytes = b"simulated",
    ) -> None:
        self.cost = cost
        self.now = 0.0
        self.block_size = block_size
        self.hash_key = hash_key
        # Fitted from the simulated steps, as the engine fits its own: admission reads it.
        self.step_time = StepTimeModel()
        self.kv = KVCacheManager(BlockPool(num_blocks, enable_prefix_caching), block_size)
        config = SchedulerConfig(max_num_seqs, max_num_batched_tokens, max_model_len)
        self.scheduler = Scheduler(config, self.kv, policy(self.step_time), clock=self.clock)
        self.busy_s = 0.0  # machine-seconds the simulated steps took
        self.last_step: tuple[StepFeatures, float] | None = None
        self._ids = itertools.count()

    def clock(self) -> float:
        return self.now

    def add_request(
        self,
        prompt: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        priority: int = 0,
    ) -> Request:
        request = Request(
            request_id=request_id or f"sim-{next(self._ids)}",
            prompt_token_ids=list(prompt),
            params=params,
            arrival_time=self.now,
            priority=priority,
            block_size=self.block_size,
            hash_key=self.hash_key,
        )
        self.scheduler.add_request(request)
        return request

    def abort_request(self, request_id: str) -> bool:
        return self.scheduler.abort(request_id) is not None

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestDelta]:
        out = self.scheduler.schedule()
        if not out:
            return []
        features = step_features(out)
        seconds = self.cost.seconds(features)
        sampled = [
            [SIMULATED_TOKEN] if r.num_computed_tokens + n >= r.num_tokens else []
            for r, n in zip(out.requests, out.num_scheduled_tokens)
        ]
        self.scheduler.update_from_output(out, sampled)
        self.now += seconds
        self.busy_s += seconds
        self.last_step = (features, seconds)
        self.step_time.observe(out.total_tokens, seconds)
        self.scheduler.policy.observe(features, seconds)
        return [
            RequestDelta(
                request.request_id,
                tokens,
                "",
                finished=request.status.finished,
                finish_reason=request.status.value if request.status.finished else None,
                num_prompt_tokens=request.num_prompt_tokens,
                num_output_tokens=request.num_output_tokens,
            )
            for request, tokens in zip(out.requests, sampled)
            if tokens
        ]


@dataclass(frozen=True, slots=True)
class SimSettings:
    """The worker being simulated and the SLOs it is judged (and admits) by."""

    num_blocks: int = 4096
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 4096
    vocab_size: int = 1024
    slo_ttft_s: float = 1.0
    slo_itl_s: float = 0.05


def simulate(
    trace: list[TraceRequest],
    kind: str,
    cost: StepCost,
    settings: SimSettings | None = None,
    learned: LearnedParams | str | None = None,
    seed: int = 0,
) -> ReplayResult:
    """Replays a trace under one batching policy. `fixed` runs as a plain engine does (every
    request queued); `adaptive` and `learned` admit by the SLOs, as a worker serving them does."""
    s = settings or SimSettings()

    def policy(step_time: StepTimeModel) -> BatchingPolicy:
        return make_batching_policy(
            kind, s.max_num_batched_tokens, s.max_num_seqs, step_time, learned=learned
        )

    engine = SimulatedEngine(
        cost,
        policy,
        s.num_blocks,
        s.block_size,
        s.max_num_seqs,
        s.max_num_batched_tokens,
        s.max_model_len,
    )
    engine.scheduler.policy.set_targets(s.slo_ttft_s, s.slo_itl_s)
    admission = admission_for(kind, s, engine.step_time)
    return replay(trace, engine, VirtualClock(engine), s.vocab_size, admission, seed=seed)


def admission_for(kind: str, s: SimSettings, step_time: StepTimeModel) -> AdmissionControl | None:
    if kind == "fixed":
        return None
    return AdmissionControl(
        s.slo_ttft_s, s.max_num_batched_tokens, step_time, s.max_num_seqs, s.slo_itl_s
    )
