"""A stateful model check of the scheduler with a stand-in model that reads its KV cache.

The stand-in "model" writes each computed token into the slot its block table names, and
predicts the next token from the context it reads back through the table. Any block the
scheduler or the KV manager serves wrongly (a stale prefix, a reused slot, a rejected draft's
KV) therefore changes a request's output, which is compared with the same request run alone.
Random arrivals (sharing prompt heads, so the prefix cache and deferred admission are
exercised), aborts, speculative drafts (right and wrong), preemptions in a small pool, and
finishes at EOS or length must never leak a block or change a greedy output.
"""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvstore.sampling_params import SamplingParams
from workers.block_pool import BlockPool
from workers.kv_cache import KVCacheManager
from workers.request import Request, RequestStatus
from workers.scheduler import Scheduler, SchedulerConfig

BS = 4
VOCAB = 40
EOS = 0
HEADS = [[11, 12, 13, 14, 15, 16, 17, 18, 19], [21, 22, 23, 24, 25], []]
UNWRITTEN = -1


def next_token(context: Sequence[int]) -> int:
    """A deterministic stand-in for greedy decoding: depends on every token and position."""
    h = 17
    for position, token in enumerate(context):
        h = (h * 31 + (token + 3) * (position + 7)) % 1_000_003
    return h % VOCAB


def run_alone(prompt: list[int], max_tokens: int) -> list[int]:
    tokens, out = list(prompt), []
    while len(out) < max_tokens:
        token = next_token(tokens)
        tokens.append(token)
        out.append(token)
        if token == EOS:
            break
    return out


class SchedulerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.num_blocks = 14
        self.kv = KVCacheManager(BlockPool(self.num_blocks), BS)
        config = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=12, max_model_len=64)
        self.scheduler = Scheduler(config, self.kv)
        self.cache = [[UNWRITTEN] * BS for _ in range(self.num_blocks)]
        self.live: dict[str, Request] = {}
        self.finished = 0
        self.next_id = 0

    # -- the stand-in model ------------------------------------------------------------------
    def write(self, request: Request, start: int, tokens: list[int]) -> None:
        table = self.kv.block_table(request.request_id)
        for offset, token in enumerate(tokens):
            pos = start + offset
            self.cache[table[pos // BS]][pos % BS] = token

    def predict(self, request: Request, last_pos: int) -> int:
        """The next token after positions [0, last_pos], read back from the cache."""
        table = self.kv.block_table(request.request_id)
        context = [self.cache[table[p // BS]][p % BS] for p in range(last_pos + 1)]
        return next_token(context)

    def forward(self, out) -> list[list[int]]:
        sampled = []
        for i, request in enumerate(out.requests):
            start, n = request.num_computed_tokens, out.num_scheduled_tokens[i]
            drafts = out.draft_token_ids.get(i, [])
            tokens = request.token_ids[start:] + drafts if drafts else request.token_ids[start:][:n]
            self.write(request, start, tokens)
            end = start + len(tokens)
            if drafts:
                emitted = []
                for j, draft in enumerate([*drafts, None]):
                    target = self.predict(request, end - len(drafts) - 1 + j)
                    emitted.append(target)
                    if draft != target:
                        break
                sampled.append(emitted)
            elif end >= request.num_tokens:
                sampled.append([self.predict(request, end - 1)])
            else:
                sampled.append([])
        return sampled

    # -- rules -------------------------------------------------------------------------------
    @rule(
        head=st.sampled_from(HEADS),
        tail=st.lists(st.integers(1, VOCAB - 1), min_size=1, max_size=6),
        max_tokens=st.integers(1, 10),
        priority=st.integers(0, 2),
    )
    def arrive(self, head: list[int], tail: list[int], max_tokens: int, priority: int) -> None:
        rid = f"r{self.next_id}"
        self.next_id += 1
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        request = Request(
            rid, head + tail, params, 0.0, priority, block_size=BS, eos_token_ids=frozenset({EOS})
        )
        self.scheduler.add_request(request)
        self.live[rid] = request

    @precondition(lambda self: self.live)
    @rule(index=st.integers(0, 99))
    def abort(self, index: int) -> None:
        rid = sorted(self.live)[index % len(self.live)]
        assert self.scheduler.abort(rid).status is RequestStatus.FINISHED_ABORTED
        del self.live[rid]

    @precondition(lambda self: self.live)
    @rule(k=st.integers(0, 3), data=st.data())
    def step(self, k: int, data) -> None:
        decoding = {
            r.request_id: k
            for r in self.scheduler.running
            if r.num_tokens - r.num_computed_tokens == 1
        }
        out = self.scheduler.schedule(decoding)
        for i, slots in enumerate(out.num_draft_slots):
            if slots:
                request = out.requests[i]
                truth = run_alone(request.token_ids, slots)  # the right drafts, then wrong ones
                right = data.draw(st.integers(0, len(truth)))
                drafts = truth[:right] + [(t + 1) % VOCAB for t in truth[right:]]
                out.set_drafts(i, drafts)
        finished = self.scheduler.update_from_output(out, self.forward(out))
        for request in finished:
            alone = run_alone(request.prompt_token_ids, request.params.max_tokens)
            assert request.output_token_ids == alone, request.request_id
            del self.live[request.request_id]
            self.finished += 1

    # -- invariants --------------------------------------------------------------------------
    @invariant()
    def blocks_are_accounted_for(self) -> None:
        held = sum(self.kv.num_blocks_of(rid) for rid in self.live if rid in self.kv._requests)
        referenced = sum(1 for block in self.kv.pool.blocks if block.ref_cnt > 0)
        assert referenced <= held  # shared prefix blocks count once per holder
        assert self.kv.num_free_blocks + referenced == self.num_blocks

    @invariant()
    def only_live_requests_hold_blocks(self) -> None:
        assert set(self.kv._requests) <= set(self.live)
        assert {r.request_id for r in self.scheduler.running} <= set(self.live)

    def teardown(self) -> None:
        """Run everything left to completion: outputs still match, and the pool is whole."""
        for _ in range(500):
            if not self.live:
                break
            self.step(0, None)
        assert not self.live and not self.scheduler.has_unfinished()
        assert self.kv.num_free_blocks == self.num_blocks


SchedulerMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None
)
test_scheduler_machine = SchedulerMachine.TestCase
