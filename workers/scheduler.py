"""Continuous batching, and the one owner of every request's lifecycle.

`schedule()` fills each step's token budget (from the batching policy): running requests first,
in priority order (their next token plus room for speculative drafts, or the next chunk of an
unfinished prefill), then waiting requests, whose prompts are matched against the prefix cache
and prefilled in chunks. When the KV pool runs dry, the lowest-priority running request (the
most recently admitted under FCFS) is preempted: its blocks are freed and it is recomputed
later, which never changes its output. `update_from_output()` takes what the step produced:
it appends tokens, applies EOS / length / stop-token limits, commits the computed KV to the
prefix cache (dropping rejected drafts' slots) and frees the blocks of finished requests.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import time
from collections.abc import Callable, Mapping
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
    """One step's work. Request i computes `num_scheduled_tokens[i]` tokens from its
    `num_computed_tokens`; a decoding request also has `num_draft_slots[i]` KV slots reserved
    for speculative drafts, which `set_drafts` fills in before the forward pass."""

    requests: list[Request] = field(default_factory=list)
    num_scheduled_tokens: list[int] = field(default_factory=list)
    num_draft_slots: list[int] = field(default_factory=list)
    draft_token_ids: dict[int, list[int]] = field(default_factory=dict)  # index -> drafts
    preempted: list[Request] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_scheduled_tokens)

    def set_drafts(self, index: int, token_ids: list[int]) -> None:
        """Request `index` verifies these drafts after its last token (at most its slots)."""
        if not 0 < len(token_ids) <= self.num_draft_slots[index]:
            raise ValueError(f"{len(token_ids)} drafts for {self.num_draft_slots[index]} slots")
        self.draft_token_ids[index] = token_ids
        self.num_scheduled_tokens[index] = 1 + len(token_ids)

    def __bool__(self) -> bool:
        return bool(self.requests)


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        kv: KVCacheManager,
        policy: BatchingPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.clock = clock  # seconds; the simulator runs the scheduler on its virtual clock
        self.kv = kv
        self.policy = policy or FixedBatchingPolicy(
            config.max_num_batched_tokens, config.max_num_seqs
        )
        self.running: list[Request] = []  # kept sorted by Request.sort_key
        self._waiting: list[tuple[tuple[int, int], Request]] = []  # heap; finished ones skipped
        self._requests: dict[str, Request] = {}
        self._num_waiting = 0
        self._waiting_tokens = 0
        self._arrivals = 0
        self._arrived_tokens = 0
        self.num_preemptions = 0
        self.num_deferred = 0  # admissions put off a step to reuse a prefix computed in it

    # -- queue -----------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        """Queue a request, or raise ValueError if it could never run on this worker."""
        if request.request_id in self._requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        if request.num_prompt_tokens == 0:
            raise ValueError("the prompt is empty")
        if request.block_size != self.kv.block_size:
            raise ValueError(
                f"the request hashes blocks of {request.block_size} tokens, the KV cache holds "
                f"blocks of {self.kv.block_size}"
            )
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
        request.arrival_order = self._arrivals
        self._arrivals += 1
        self._arrived_tokens += request.num_prompt_tokens
        self._requests[request.request_id] = request
        self._push_waiting(request)

    def abort(self, request_id: str) -> Request | None:
        """Drop a request wherever it is and free its blocks at once."""
        request = self._requests.get(request_id)
        if request is not None:
            self.finish(request, RequestStatus.FINISHED_ABORTED)
        return request

    def finish(self, request: Request, status: RequestStatus) -> None:
        """End a request (stopped, out of length, aborted) and free its blocks."""
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status is RequestStatus.WAITING:
            self._num_waiting -= 1
            self._waiting_tokens -= request.num_tokens - request.num_computed_tokens
        request.status = status
        request.finished_time = self.clock()
        self._requests.pop(request.request_id, None)
        self.kv.free(request.request_id)
        self.policy.finished(request)

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
    def schedule(self, draft_slots: Mapping[str, int] | None = None) -> SchedulerOutput:
        """The next step's batch; `draft_slots` gives decoding requests room for that many
        speculative drafts (request id -> k)."""
        limits = self.policy.limits(
            QueueSnapshot(
                num_running=len(self.running),
                num_waiting=self._num_waiting,
                num_waiting_tokens=self._waiting_tokens,
                num_free_blocks=self.kv.num_free_blocks,
                num_running_tokens=sum(r.num_tokens for r in self.running),
                now=self.clock(),
                num_arrivals=self._arrivals,
                num_arrived_tokens=self._arrived_tokens,
            )
        )
        out = SchedulerOutput()
        computing: set[int] = set()  # hashes of the full blocks this step computes
        budget = limits.max_num_batched_tokens
        budget = self._schedule_running(out, budget, draft_slots or {}, computing)
        # Admitting new work right after preempting would only thrash the pool.
        if not out.preempted and budget > 0:
            self._schedule_waiting(out, budget, limits.max_num_seqs, computing)
        return out

    def update_from_output(self, out: SchedulerOutput, sampled: list[list[int]]) -> list[Request]:
        """Apply a step's results; returns the requests it finished (their blocks freed).

        `sampled[i]` holds request i's new tokens: none mid-prefill, one from plain sampling,
        the accepted drafts plus one after verification. The request takes them up to the
        first that ends it (EOS or a stop token id, or the length limit) and `sampled[i]` is
        cut to the tokens kept. KV is valid for everything computed except rejected drafts; it
        is committed (full blocks cached) before a finished request gives its blocks back.
        """
        if out.draft_token_ids:
            return self._update_verified(out, sampled)
        finished = []
        kv, size = self.kv, self.kv.block_size
        for request, tokens, num_new in zip(out.requests, sampled, out.num_scheduled_tokens):
            start = request.num_computed_tokens
            computed = request.num_computed_tokens = start + num_new
            status = self._take_tokens(request, tokens)
            if computed // size > start // size:  # a block filled: cache it
                kv.commit(request.request_id, request.token_ids, computed, request.block_hashes)
            if status is not None:
                self.finish(request, status)
                finished.append(request)
        return finished

    def _take_tokens(self, request: Request, tokens: list[int]) -> RequestStatus | None:
        """Append a step's sampled tokens; the finish status they cause, if any."""
        if not tokens:
            return None
        if request.first_token_time is None:
            request.first_token_time = self.clock()
        return request.append_token_ids(tokens)

    def _update_verified(self, out: SchedulerOutput, sampled: list[list[int]]) -> list[Request]:
        """`update_from_output` for a step that verified speculative drafts."""
        finished = []
        kv, drafted, size = self.kv, out.draft_token_ids, self.kv.block_size
        steps = zip(out.requests, sampled, out.num_scheduled_tokens)
        for i, (request, tokens, num_new) in enumerate(steps):
            drafts = drafted.get(i)
            status = self._take_tokens(request, tokens)
            start = request.num_computed_tokens
            computed = start + num_new
            if drafts:
                # KV holds the last known token and the accepted drafts, and no more than the
                # tokens kept when the request stopped inside a run of accepted drafts.
                computed = min(start + len(tokens), len(request.token_ids))
            request.num_computed_tokens = computed
            rid = request.request_id
            if computed // size > start // size:  # a block filled: cache it
                kv.commit(rid, request.token_ids, computed, request.block_hashes)
            if drafts:
                kv.truncate(rid, computed)
            if status is not None:
                self.finish(request, status)
                finished.append(request)
        return finished

    # -- internals --------------------------------------------------------------------------
    def _schedule_running(
        self,
        out: SchedulerOutput,
        budget: int,
        draft_slots: Mapping[str, int],
        computing: set[int],
    ) -> int:
        """Schedule running requests in priority order, preempting from the back when the
        pool runs dry; returns the budget left. Adds the prefill chunks' full blocks to
        `computing`."""
        size = self.kv.block_size
        running, allocate = self.running, self.kv.allocate_slots
        counts, slots_of = out.num_scheduled_tokens, out.num_draft_slots
        add_count, add_slots = counts.append, slots_of.append
        index = 0
        while index < len(running) and budget > 0:
            request = running[index]
            start = request.num_computed_tokens
            num_new = len(request.token_ids) - start
            if num_new > budget:
                num_new = budget
            slots = 0
            if draft_slots and num_new == 1:
                slots = min(draft_slots.get(request.request_id, 0), budget - num_new)
            while not allocate(request.request_id, start + num_new + slots):
                victim = running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is request:
                    out.requests.extend(running[:index])
                    return budget
            add_count(num_new)
            if draft_slots:
                add_slots(slots)
            budget -= num_new + slots
            index += 1
            if num_new > 1:
                computing.update(request.block_hashes[start // size : (start + num_new) // size])
        out.requests.extend(running[:index])
        if not draft_slots:
            slots_of.extend(itertools.repeat(0, index))
        return budget

    def _schedule_waiting(
        self, out: SchedulerOutput, budget: int, max_num_seqs: int, computing: set[int]
    ) -> None:
        """Admit waiting requests while budget, sequences and blocks last.

        A request whose next uncached block is being computed in this very step (its hash is
        in `computing`) waits one step instead, and then finds that block in the cache: a
        burst of prompts sharing a system prompt computes the prefix once, not once each.
        """
        deferred: list[Request] = []
        caching = self.kv.pool.enable_caching
        while budget > 0 and len(self.running) < max_num_seqs:
            request = self._peek_waiting()
            if request is None:
                break
            match = self.kv.match_prefix(request.token_ids, request.block_hashes)
            num_matched = len(match.blocks)
            if caching and num_matched < len(request.block_hashes):
                if request.block_hashes[num_matched] in computing:
                    deferred.append(self._pop_waiting())
                    self.num_deferred += 1
                    continue
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
            if request.first_scheduled_time is None:
                request.first_scheduled_time = self.clock()
            bisect.insort(self.running, request, key=Request.sort_key)
            out.requests.append(request)
            out.num_scheduled_tokens.append(num_new)
            out.num_draft_slots.append(0)
            budget -= num_new
            computing.update(request.block_hashes[num_matched : total // self.kv.block_size])
        for request in deferred:
            self._push_waiting(request)

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request.request_id)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self._push_waiting(request)

    def _push_waiting(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        heapq.heappush(self._waiting, (self.policy.waiting_key(request), request))
        self._num_waiting += 1
        self._waiting_tokens += request.num_tokens - request.num_computed_tokens

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
        self._waiting_tokens -= request.num_tokens - request.num_computed_tokens
        return request
