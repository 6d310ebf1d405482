"""Continuous batching: every step, one batch of running decodes plus chunks of new prompts.

Each step fills a token budget (from the batching policy): running requests first, in priority
order (their next token, or the next chunk of an unfinished prefill), then waiting requests,
whose prompts are matched against the prefix cache and prefilled in chunks. When the KV pool
runs dry, the lowest-priority running request (the most recently admitted under FCFS) is
preempted: its blocks are freed and it is recomputed later, which never changes its output.
"""

from __future__ import annotations

import bisect
import heapq
import time
from dataclasses import dataclass, field

from workers.batching_policy import BatchingPolicy, FixedBatchingPolicy, QueueSnapshot
from workers.kv_cache import KVCacheManager
from workers.request import Request, RequestStatus


@dataclass(slots=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                f"max_num_seqs ({self.max_num_seqs}) so every running request can decode"
            )
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                "without chunked prefill, max_num_batched_tokens must be >= max_model_len"
            )


@dataclass(slots=True)
class SchedulerOutput:
    requests: list[Request] = field(default_factory=list)
    num_scheduled_tokens: list[int] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_scheduled_tokens)

    def __bool__(self) -> bool:
        return bool(self.requests)


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        kv: KVCacheManager,
        policy: BatchingPolicy | None = None,
    ) -> None:
        self.config = config
        self.kv = kv
        self.policy = policy or FixedBatchingPolicy(
            config.max_num_batched_tokens, config.max_num_seqs
        )
        self.running: list[Request] = []  # kept sorted by Request.sort_key
        self._waiting: list[tuple[tuple[int, int], Request]] = []  # heap; aborted ones skipped
        self._requests: dict[str, Request] = {}
        self._num_waiting = 0
        self._waiting_tokens = 0
        self._arrivals = 0
        self._last_arrival = time.monotonic()
        self._arrival_rate = 0.0
        self.num_preemptions = 0

    # -- queue -----------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        """Queue a request, or raise ValueError if it could never run on this worker."""
        if request.request_id in self._requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        if request.num_prompt_tokens == 0:
            raise ValueError("the prompt is empty")
        if request.max_total_tokens > self.config.max_model_len:
            raise ValueError(
                f"prompt ({request.num_prompt_tokens} tokens) + max_tokens "
                f"({request.params.max_tokens}) exceeds the model's context length of "
                f"{self.config.max_model_len} tokens"
            )
        pool_tokens = self.kv.pool.num_blocks * self.kv.block_size
        if request.max_total_tokens > pool_tokens:
            raise ValueError(
                f"prompt + max_tokens ({request.max_total_tokens} tokens) exceeds the whole "
                f"KV cache of this worker ({pool_tokens} tokens)"
            )
        now = time.monotonic()
        gap = now - self._last_arrival
        self._last_arrival = now
        if gap > 0:
            self._arrival_rate = 0.8 * self._arrival_rate + 0.2 / max(gap, 1e-3)
        request.arrival_order = self._arrivals
        self._arrivals += 1
        self._requests[request.request_id] = request
        self._push_waiting(request)

    def abort(self, request_id: str) -> Request | None:
        """Drop a request wherever it is and free its blocks at once."""
        request = self._requests.get(request_id)
        if request is not None:
            self.finish(request, RequestStatus.FINISHED_ABORTED)
        return request

    def finish(self, request: Request, status: RequestStatus) -> None:
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status is RequestStatus.WAITING:
            self._num_waiting -= 1
            self._waiting_tokens -= request.num_tokens - request.num_computed_tokens
        request.status = status
        self._requests.pop(request.request_id, None)
        self.kv.free(request.request_id)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return self._num_waiting

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def get(self, request_id: str) -> Request | None:
        return self._requests.get(request_id)

    # -- one step ---------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        limits = self.policy.limits(
            QueueSnapshot(
                num_running=len(self.running),
                num_waiting=self._num_waiting,
                num_waiting_tokens=self._waiting_tokens,
                arrival_rate=self._arrival_rate,
                num_free_blocks=self.kv.num_free_blocks,
            )
        )
        budget = limits.max_num_batched_tokens
        out = SchedulerOutput()

        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = request.num_tokens - request.num_computed_tokens
            if num_new == 1:  # decoding: room for the drafts to verify as well
                num_new += request.spec_k
            num_new = min(num_new, budget)
            total = request.num_computed_tokens + num_new
            while not self.kv.allocate_slots(request.request_id, total):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is request:
                    break
            if request.status is not RequestStatus.RUNNING:
                break
            out.requests.append(request)
            out.num_scheduled_tokens.append(num_new)
            budget -= num_new
            index += 1

        # Admitting new work right after preempting would only thrash the pool.
        while not out.preempted and budget > 0 and len(self.running) < limits.max_num_seqs:
            request = self._peek_waiting()
            if request is None:
                break
            match = self.kv.match_prefix(request.token_ids)
            num_new = request.num_tokens - match.num_cached_tokens
            if num_new > budget:
                if not self.config.enable_chunked_prefill:
                    break
                num_new = budget
            total = match.num_cached_tokens + num_new
            if not self.kv.allocate_slots(request.request_id, total, prefix=match):
                break
            self._pop_waiting()
            request.num_computed_tokens = match.num_cached_tokens
            if request.num_preemptions == 0:
                request.num_cached_tokens = match.num_cached_tokens
            request.status = RequestStatus.RUNNING
            bisect.insort(self.running, request, key=Request.sort_key)
            out.requests.append(request)
            out.num_scheduled_tokens.append(num_new)
            budget -= num_new
        return out

    def update_after_step(
        self, out: SchedulerOutput, num_computed: list[int] | None = None
    ) -> None:
        """Record how many tokens' KV the step wrote per request (default: all scheduled; fewer
        when speculative drafts were rejected) and cache blocks that are now full. Called after
        the step's new tokens are appended; finished requests are skipped."""
        advances = num_computed or out.num_scheduled_tokens
        for request, num_new in zip(out.requests, advances):
            if request.status.finished:
                continue
            # Capped by the tokens known: a request that stopped inside a run of accepted drafts
            # kept only the tokens up to its stop.
            request.num_computed_tokens = min(
                request.num_computed_tokens + num_new, request.num_tokens
            )
            self.kv.commit(request.request_id, request.token_ids, request.num_computed_tokens)

    # -- internals --------------------------------------------------------------------------
    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request.request_id)
        request.num_computed_tokens = 0
        request.spec_k = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self._push_waiting(request)

    def _push_waiting(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        heapq.heappush(self._waiting, (request.sort_key(), request))
        self._num_waiting += 1
        self._waiting_tokens += request.num_tokens

    def _peek_waiting(self) -> Request | None:
        while self._waiting:
            request = self._waiting[0][1]
            if request.status is RequestStatus.WAITING:
                return request
            heapq.heappop(self._waiting)  # finished (aborted) while waiting
        return None

    def _pop_waiting(self) -> Request:
        _, request = heapq.heappop(self._waiting)
        self._num_waiting -= 1
        self._waiting_tokens -= request.num_tokens
        return request
