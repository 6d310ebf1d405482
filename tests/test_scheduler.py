"""The scheduler alone (no model): budgets, priority, chunking, preemption order, rejection."""

from __future__ import annotations

import pytest

from kvstore.sampling_params import SamplingParams
from workers.block_pool import BlockPool
from workers.kv_cache import KVCacheManager
from workers.request import Request, RequestStatus
from workers.scheduler import Scheduler, SchedulerConfig


def make(num_blocks=32, block_size=4, **config) -> Scheduler:
    kv = KVCacheManager(BlockPool(num_blocks), block_size)
    defaults = dict(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=128)
    return Scheduler(SchedulerConfig(**{**defaults, **config}), kv)


def request(rid: str, n: int, priority: int = 0, max_tokens: int = 8) -> Request:
    """A prompt of n tokens no other request shares (so the prefix cache stays out of it)."""
    first = 1000 * (sum(map(ord, rid)) % 50)
    tokens = list(range(first, first + n))
    params = SamplingParams(max_tokens=max_tokens)
    return Request(rid, tokens, params, 0.0, priority, block_size=4)  # as make()'s cache


def finish_step(sched: Scheduler, out) -> list[Request]:
    """Pretend the model ran: every request whose step reached its end samples token 7."""
    sampled = [
        [7] if r.num_computed_tokens + n >= r.num_tokens else []
        for r, n in zip(out.requests, out.num_scheduled_tokens)
    ]
    return sched.update_from_output(out, sampled)


def test_priority_then_arrival_order_and_chunked_budget():
    sched = make(max_num_batched_tokens=20)
    for rid, n, prio in [("late-urgent", 10, -1), ("first", 10, 0), ("second", 10, 0)]:
        sched.add_request(request(rid, n, prio))
    out = sched.schedule()
    assert [r.request_id for r in out.requests] == ["late-urgent", "first"]
    assert out.num_scheduled_tokens == [10, 10]
    finish_step(sched, out)
    out = sched.schedule()  # two decodes first, then a chunk of the waiting prompt
    assert [r.request_id for r in out.requests] == ["late-urgent", "first", "second"]
    assert out.num_scheduled_tokens == [1, 1, 10]


def test_lowest_priority_is_preempted_and_resumes_from_scratch():
    sched = make(num_blocks=6, block_size=4)  # 24 slots
    sched.add_request(request("a", 10, priority=0))
    sched.add_request(request("b", 10, priority=1))
    out = sched.schedule()
    finish_step(sched, out)  # a and b hold 3 blocks each: the pool is full
    for _ in range(3):
        out = sched.schedule()
        finish_step(sched, out)
    # a's 13th token needs a 4th block: b (lower priority) is preempted, a keeps going.
    assert [r.request_id for r in out.preempted] == ["b"]
    b = sched.get("b")
    assert b.status is RequestStatus.WAITING and b.num_computed_tokens == 0
    assert b.num_tokens == 13 and b.num_preemptions == 1  # its outputs are kept, KV recomputed
    assert sched.num_preemptions == 1


def test_requests_that_can_never_fit_are_refused():
    sched = make(num_blocks=4, block_size=4)
    with pytest.raises(ValueError, match="context length of 128"):
        sched.add_request(request("long", 125, max_tokens=8))
    with pytest.raises(ValueError, match="whole KV cache"):
        sched.add_request(request("big", 10, max_tokens=10))
    sched.add_request(request("ok", 4))
    with pytest.raises(ValueError, match="already in use"):
        sched.add_request(request("ok", 4))


def test_abort_frees_blocks_wherever_the_request_is():
    sched = make()
    sched.add_request(request("running", 9))
    finish_step(sched, sched.schedule())
    sched.add_request(request("waiting", 9))
    assert sched.kv.num_free_blocks < 32
    assert sched.abort("running").status is RequestStatus.FINISHED_ABORTED
    assert sched.abort("waiting").status is RequestStatus.FINISHED_ABORTED
    assert sched.abort("unknown") is None
    assert sched.kv.num_free_blocks == 32 and not sched.has_unfinished()
    assert not sched.schedule()
