"""KV cache manager: prefix matching, lazy tables, rollback, fork, free order, and a stateful
model check that simulates the KV each block holds, so serving wrong KV is caught."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvstore.events import BlockStored
from kvstore.hashing import hash_blocks
from workers import kv_cache
from workers.block_pool import BlockPool, KVBlock, NoFreeBlocksError
from workers.kv_cache import KVCacheManager

BS = 4


class HashingKV(KVCacheManager):
    """The manager as the scheduler drives it, with each call's block hashes computed from its
    tokens (a Request carries them; here they are hashed on the spot)."""

    def __init__(self, pool: BlockPool, block_size: int, extra_key: bytes = b"") -> None:
        super().__init__(pool, block_size)
        self.extra_key = extra_key

    def match_prefix(self, token_ids):
        return super().match_prefix(token_ids, hash_blocks(token_ids, BS, self.extra_key))

    def commit(self, request_id, token_ids, num_computed_tokens):
        hashes = hash_blocks(token_ids, BS, self.extra_key)
        super().commit(request_id, token_ids, num_computed_tokens, hashes)


def make(num_blocks: int = 16, caching: bool = True, extra_key: bytes = b"") -> HashingKV:
    return HashingKV(BlockPool(num_blocks, caching), BS, extra_key)


def free_ids(mgr: KVCacheManager) -> list[int]:
    return [block.block_id for block in mgr.pool.free_blocks()]


def run_prompt(mgr: KVCacheManager, rid: str, prompt: list[int]) -> int:
    """Admit ``prompt`` with prefix matching, compute all of it; returns cached tokens."""
    match = mgr.match_prefix(prompt)
    assert mgr.allocate_slots(rid, len(prompt), match)
    mgr.commit(rid, prompt, len(prompt))
    return match.num_cached_tokens


SYSTEM = [11, 12, 13, 14, 15, 16, 17, 18]


def test_shared_system_prompt() -> None:
    mgr = make()
    a = SYSTEM + [100, 101, 102]
    assert run_prompt(mgr, "a", a) == 0
    assert mgr.block_table("a") == [0, 1, 2]
    h = hash_blocks(a, BS)
    assert mgr.drain_events() == [BlockStored(tuple(h))]
    assert run_prompt(mgr, "b", SYSTEM + [200, 201]) == 8
    assert mgr.block_table("b") == [0, 1, 3]
    assert [block.ref_cnt for block in mgr.pool.blocks[:4]] == [2, 2, 1, 1]
    stats = mgr.stats()
    assert (stats["prefix_cache_queries"], stats["prefix_cache_hits"]) == (21, 8)
    assert (stats["cache_lookups"], stats["cache_hits"]) == (2 + 2, 2)
    # A freed request's prompt stays findable until its blocks are reallocated.
    mgr.free("a")
    mgr.free("b")
    assert run_prompt(mgr, "c", a) == 8
    assert mgr.block_table("c") == [0, 1, 3]  # the uncached tail block is reused first


def test_exact_multiple_prompt_backs_off_one_block() -> None:
    mgr = make()
    run_prompt(mgr, "a", SYSTEM)
    match = mgr.match_prefix(SYSTEM)
    assert match.num_cached_tokens == 4 and [b.block_id for b in match.blocks] == [0]
    assert mgr.match_prefix(SYSTEM + [1]).num_cached_tokens == 8
    assert mgr.match_prefix(SYSTEM[:5]).num_cached_tokens == 4
    assert mgr.match_prefix(SYSTEM[:4]).num_cached_tokens == 0
    assert mgr.match_prefix([]).num_cached_tokens == 0
    assert mgr.match_prefix([11, 12, 13, 99, 15]).num_cached_tokens == 0


def test_match_prefix_is_pure() -> None:
    mgr = make()
    run_prompt(mgr, "a", SYSTEM + [1])
    mgr.free("a")
    before = (free_ids(mgr), mgr.stats())
    assert mgr.match_prefix(SYSTEM + [2]).num_cached_tokens == 8
    assert (free_ids(mgr), mgr.stats()) == before


def test_cache_disabled() -> None:
    mgr = make(caching=False)
    assert run_prompt(mgr, "a", SYSTEM + [1]) == 0
    assert run_prompt(mgr, "b", SYSTEM + [1]) == 0
    assert all(block.block_hash is None for block in mgr.pool.blocks)
    assert mgr.drain_events() == []
    assert mgr.stats()["prefix_cache_hits"] == 0


def test_extra_key_separates_models() -> None:
    pool = BlockPool(8)
    a, b = HashingKV(pool, BS, b"model-a"), HashingKV(pool, BS, b"model-b")
    run_prompt(a, "x", SYSTEM + [1])
    assert b.match_prefix(SYSTEM + [1]).num_cached_tokens == 0
    assert a.match_prefix(SYSTEM + [1]).num_cached_tokens == 8


def test_hash_collision_never_serves_wrong_kv() -> None:
    mgr = KVCacheManager(BlockPool(8), BS)
    assert mgr.allocate_slots("a", 5, mgr.match_prefix([1, 2, 3, 4, 5], [42]))
    mgr.commit("a", [1, 2, 3, 4, 5], 5, [42])  # every block "hashes" to 42
    assert mgr.match_prefix([9, 9, 9, 9, 9], [42]).num_cached_tokens == 0
    assert mgr.match_prefix([1, 2, 3, 4, 9], [42]).num_cached_tokens == 4


def test_lazy_allocation_across_block_boundaries() -> None:
    mgr = make()
    for num_tokens, num_blocks in [(1, 1), (4, 1), (5, 2), (8, 2), (9, 3), (2, 3), (12, 3)]:
        assert mgr.allocate_slots("r", num_tokens)
        assert mgr.num_blocks_of("r") == num_blocks
    assert mgr.block_table("r") == [0, 1, 2]
    assert mgr.stats()["allocation_calls"] == 3


def test_allocate_failure_changes_nothing() -> None:
    mgr = make(num_blocks=4)
    run_prompt(mgr, "a", SYSTEM + [1])  # 3 blocks, 2 of them cached
    mgr.free("a")
    mgr.drain_events()
    before = (free_ids(mgr), mgr.stats())
    match = mgr.match_prefix(SYSTEM + [2])
    assert match.num_cached_tokens == 8
    # 5 blocks needed: 2 cached (free, so they count as consumed) + 3 new > 4 free.
    assert not mgr.allocate_slots("b", 17, match)
    assert (free_ids(mgr), mgr.stats(), mgr.drain_events()) == (*before, [])
    with pytest.raises(KeyError):
        mgr.num_blocks_of("b")
    assert mgr.allocate_slots("b", 16, match)
    assert mgr.block_table("b") == [0, 1, 2, 3]
    assert mgr.num_free_blocks == 0
    assert not mgr.allocate_slots("b", 17)
    assert mgr.num_blocks_of("b") == 4


def test_stale_prefix_match_is_refused() -> None:
    mgr = make(num_blocks=3)
    run_prompt(mgr, "a", SYSTEM + [1])
    mgr.free("a")
    match = mgr.match_prefix(SYSTEM + [2])
    assert mgr.allocate_slots("hog", 12)  # evicts every cached block
    mgr.free("hog")
    with pytest.raises(ValueError, match="stale"):
        mgr.allocate_slots("b", 9, match)


def test_prefix_only_on_first_allocation() -> None:
    mgr = make()
    assert mgr.allocate_slots("a", 3)
    with pytest.raises(ValueError):
        mgr.allocate_slots("a", 5, mgr.match_prefix([1, 2, 3]))


def test_commit_registers_blocks_as_they_fill() -> None:
    mgr = make()
    tokens = list(range(10))
    assert mgr.allocate_slots("r", 10)
    mgr.commit("r", tokens[:3], 3)
    assert mgr.drain_events() == []
    mgr.commit("r", tokens[:6], 6)
    assert mgr.drain_events() == [BlockStored((hash_blocks(tokens, BS)[0],))]
    mgr.commit("r", tokens, 10)
    assert mgr.drain_events() == [BlockStored((hash_blocks(tokens, BS)[1],))]
    assert mgr.pool.blocks[2].block_hash is None
    with pytest.raises(ValueError):
        mgr.commit("r", tokens, 9)
    with pytest.raises(ValueError):
        mgr.commit("r", tokens + [1, 2, 3], 13)


def test_duplicate_prompts_in_flight() -> None:
    mgr = make()
    prompt = SYSTEM + [1]
    for rid in ("a", "b"):
        assert mgr.allocate_slots(rid, len(prompt), mgr.match_prefix(prompt))
    for rid in ("a", "b"):
        mgr.commit(rid, prompt, len(prompt))
    assert [b.block_hash is not None for b in mgr.pool.blocks[:6]] == [True, True] + [False] * 4
    mgr.free("a")
    mgr.free("b")
    assert mgr.num_free_blocks == 16


def test_truncate_rolls_back_drafts_across_a_block_boundary() -> None:
    mgr = make()
    tokens = list(range(6))
    assert mgr.allocate_slots("r", 6 + 4)  # 6 tokens plus 4 draft slots: 3 blocks
    mgr.commit("r", tokens, 6)
    mgr.truncate("r", 7)  # one draft accepted
    assert mgr.block_table("r") == [0, 1]
    assert free_ids(mgr)[0] == 2  # the uncached draft block is the next to be reused
    mgr.truncate("r", 8)
    assert mgr.num_blocks_of("r") == 2
    mgr.commit("r", tokens + [6, 7], 8)
    with pytest.raises(ValueError, match="cached or shared"):
        mgr.truncate("r", 6)
    mgr.truncate("r", 4)  # whole cached blocks may go: they stay findable
    assert mgr.block_table("r") == [0]
    assert mgr.match_prefix(tokens + [6, 7, 0]).num_cached_tokens == 8


def test_truncate_forgets_hashes_of_dropped_blocks() -> None:
    mgr = make()
    old = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert mgr.allocate_slots("r", 9)
    mgr.commit("r", old, 9)
    mgr.truncate("r", 4)
    new = [1, 2, 3, 4, 0, 0, 0, 0, 9, 9, 9, 9, 9]
    assert mgr.allocate_slots("r", 13)
    mgr.commit("r", new, 12)
    table = mgr.block_table("r")
    assert [mgr.pool.blocks[i].block_hash for i in table[:3]] == hash_blocks(new, BS)
    assert mgr.match_prefix(new).num_cached_tokens == 12


def test_fork_shares_full_blocks_and_copies_the_partial_one() -> None:
    mgr = make(num_blocks=4)
    tokens = list(range(6))
    assert mgr.allocate_slots("p", 6)
    mgr.commit("p", tokens, 6)
    assert mgr.fork("p", "c") == (1, 2)
    assert mgr.block_table("c") == [0, 2]
    assert [block.ref_cnt for block in mgr.pool.blocks] == [2, 1, 1, 0]
    assert mgr.fork("c", "d") == (2, 3)
    with pytest.raises(NoFreeBlocksError):
        mgr.fork("p", "e")
    assert [block.ref_cnt for block in mgr.pool.blocks] == [3, 1, 1, 1]
    with pytest.raises(ValueError):
        mgr.fork("p", "c")
    assert mgr.allocate_slots("p", 8)
    mgr.commit("p", tokens + [6, 7], 8)
    assert mgr.fork("p", "e") is None
    assert mgr.block_table("e") == [0, 1]
    for rid in ("p", "c", "d", "e"):
        mgr.free(rid)
    assert mgr.num_free_blocks == 4


def test_free_releases_tail_first_and_is_idempotent() -> None:
    mgr = make(num_blocks=8)
    run_prompt(mgr, "a", SYSTEM + [1, 2])  # blocks 0, 1, 2
    run_prompt(mgr, "b", SYSTEM + [3, 4, 5, 6, 7])  # shares 0, 1; owns 3, 4
    mgr.free("b")
    # Tail first: the partial block 4 (uncached) goes to the head, the full block 3 (cached)
    # to the tail, where it stays findable longest.
    assert free_ids(mgr) == [4, 5, 6, 7, 3]
    mgr.free("a")
    assert free_ids(mgr) == [2, 4, 5, 6, 7, 3, 1, 0]
    mgr.free("a")
    mgr.free("never-seen")
    assert mgr.num_free_blocks == 8


def test_block_table_is_a_copy() -> None:
    mgr = make()
    assert mgr.allocate_slots("r", 5)
    mgr.block_table("r").append(99)
    assert mgr.block_table("r") == [0, 1]


# Shared prompt heads of several lengths (none, partial block, exact blocks) from a tiny
# alphabet, so prompts collide on prefixes and the cache gets hits.
HEADS = [[], [1, 2, 3, 1, 2], [1, 2, 3, 1, 2, 3, 1, 2], [2, 2, 2, 2, 1, 1, 1, 1, 3, 3, 3]]
GARBAGE = -1  # KV of a stale, foreign or rejected-draft slot


@dataclass(slots=True)
class Request:
    """The model's view of a request: known tokens, KV-written tokens, table slots."""

    tokens: list[int]
    num_computed: int
    num_slots: int


class ManagerMachine(RuleBasedStateMachine):
    """Random request lifecycles under pool pressure, checked against a model of block KV.

    ``kv`` plays the worker: it records which token each slot of each block holds, written
    only through block tables, so any block the manager shares or serves wrongly shows up.
    """

    caching = True

    def __init__(self) -> None:
        super().__init__()
        self.mgr = HashingKV(BlockPool(12, self.caching), BS, b"m")
        self.kv = {block_id: [GARBAGE] * BS for block_id in range(12)}
        self.reqs: dict[str, Request] = {}
        self.raw: list[list[KVBlock]] = []  # blocks held by something else: pool pressure
        self.seen: list[tuple[int, ...]] = []
        self.next_id = 0

    def pick(self, index: int) -> str:
        return sorted(self.reqs)[index % len(self.reqs)]

    def write(self, rid: str, start: int, stop: int, tokens: list[int] | None) -> None:
        table = self.mgr.block_table(rid)
        for pos in range(start, stop):
            self.kv[table[pos // BS]][pos % BS] = tokens[pos] if tokens else GARBAGE

    def snapshot(self) -> tuple:
        tables = {rid: self.mgr.block_table(rid) for rid in self.reqs}
        return free_ids(self.mgr), self.mgr.stats(), tables

    def grow(self, rid: str, num_tokens: int, match: kv_cache.PrefixMatch | None) -> bool:
        """allocate_slots, checking the predicted outcome; new blocks hold garbage KV."""
        held = self.mgr.num_blocks_of(rid) if rid in self.reqs else len(match.blocks)
        revived = sum(block.ref_cnt == 0 for block in match.blocks) if match else 0
        need = max(0, -(-num_tokens // BS) - held)
        expected = need + revived <= self.mgr.num_free_blocks
        self.mgr.drain_events()
        before = self.snapshot()
        ok = self.mgr.allocate_slots(rid, num_tokens, match)
        assert ok is expected
        if not ok:
            assert self.snapshot() == before and self.mgr.drain_events() == []
            return False
        for block_id in self.mgr.block_table(rid)[held:]:
            self.kv[block_id] = [GARBAGE] * BS
        return True

    @rule(
        head=st.sampled_from(HEADS),
        tail=st.lists(st.integers(1, 3), min_size=1, max_size=6),
        prefill=st.booleans(),
    )
    def admit(self, head: list[int], tail: list[int], prefill: bool) -> None:
        self.start(head + tail, len(tail), prefill)

    @precondition(lambda self: self.seen)
    @rule(index=st.integers(0, 99), chunk=st.integers(1, 12))
    def admit_again(self, index: int, chunk: int) -> None:
        """Identical prompts: exact block multiples must back off one block."""
        self.start(list(self.seen[index % len(self.seen)]), chunk, True)

    def start(self, prompt: list[int], chunk: int, prefill: bool) -> None:
        match = self.mgr.match_prefix(prompt)
        cached = match.num_cached_tokens
        assert cached == len(match.blocks) * BS < len(prompt)
        hashes = hash_blocks(prompt, BS, b"m")
        for i, block in enumerate(match.blocks):
            tokens = prompt[i * BS : (i + 1) * BS]
            assert self.kv[block.block_id] == tokens  # the KV served is the prompt's KV
            assert block.block_hash == hashes[i] and block.token_ids == tuple(tokens)
        k = len(match.blocks)
        if (k + 1) * BS < len(prompt):  # the match is the longest
            assert self.mgr.pool.lookup(hashes[k], prompt[k * BS : (k + 1) * BS]) is None
        self.seen.append(tuple(prompt))
        rid = f"r{self.next_id}"
        self.next_id += 1
        num_tokens = min(len(prompt), cached + chunk)
        if not self.grow(rid, num_tokens, match):
            return
        self.reqs[rid] = req = Request(prompt, cached, max(num_tokens, cached))
        if prefill:
            self.write(rid, cached, num_tokens, prompt)
            self.mgr.commit(rid, prompt, num_tokens)
            req.num_computed = num_tokens

    @precondition(lambda self: self.reqs)
    @rule(index=st.integers(0, 99), n=st.integers(1, 6), drafts=st.integers(0, 3))
    def schedule(self, index: int, n: int, drafts: int) -> None:
        req = self.reqs[rid := self.pick(index)]
        target = min(req.num_computed + n, len(req.tokens)) + drafts
        if self.grow(rid, target, None):
            req.num_slots = max(req.num_slots, target)

    @precondition(lambda self: self.reqs)
    @rule(index=st.integers(0, 99), n=st.integers(0, 8), drafts=st.booleans())
    def compute(self, index: int, n: int, drafts: bool) -> None:
        req = self.reqs[rid := self.pick(index)]
        new = min(req.num_computed + n, req.num_slots, len(req.tokens))
        self.write(rid, req.num_computed, new, req.tokens)
        if drafts:  # rejected drafts were written past the accepted tokens
            self.write(rid, new, req.num_slots, None)
        self.mgr.commit(rid, req.tokens, new)
        req.num_computed = new

    @precondition(lambda self: self.reqs)
    @rule(index=st.integers(0, 99), token=st.integers(1, 3))
    def generate(self, index: int, token: int) -> None:
        req = self.reqs[self.pick(index)]
        if req.num_computed == len(req.tokens):
            req.tokens.append(token)

    @precondition(lambda self: self.reqs)
    @rule(
        index=st.integers(0, 99),
        cut=st.integers(0, 12),
        aligned=st.booleans(),
        rewrite=st.none() | st.lists(st.integers(1, 3), max_size=8),
    )
    def rollback(self, index: int, cut: int, aligned: bool, rewrite: list[int] | None) -> None:
        """Drop slots; with ``rewrite`` the tokens past the cut are replaced too."""
        req = self.reqs[rid := self.pick(index)]
        num_tokens = max(0, req.num_slots - cut)
        if aligned:
            num_tokens -= num_tokens % BS
        table = self.mgr.block_table(rid)
        last = num_tokens // BS
        refused = num_tokens % BS != 0 and last < len(table)
        if refused:
            block = self.mgr.pool.blocks[table[last]]
            refused = block.block_hash is not None or block.ref_cnt > 1
        if refused:
            before = self.snapshot()
            with pytest.raises(ValueError):
                self.mgr.truncate(rid, num_tokens)
            assert self.snapshot() == before
            return
        self.mgr.truncate(rid, num_tokens)
        assert self.mgr.num_blocks_of(rid) == min(len(table), -(-num_tokens // BS))
        req.num_slots = num_tokens
        req.num_computed = min(req.num_computed, num_tokens)
        if rewrite is not None:
            req.tokens[max(num_tokens, 1) :] = rewrite

    @precondition(lambda self: self.reqs)
    @rule(index=st.integers(0, 99))
    def fork(self, index: int) -> None:
        req = self.reqs[rid := self.pick(index)]
        child = f"r{self.next_id}"
        self.next_id += 1
        if req.num_computed % BS and self.mgr.num_free_blocks == 0:
            before = self.snapshot()
            with pytest.raises(NoFreeBlocksError):
                self.mgr.fork(rid, child)
            assert self.snapshot() == before
            return
        pair = self.mgr.fork(rid, child)
        assert (pair is not None) == (req.num_computed % BS != 0)
        if pair is not None:
            self.kv[pair[1]] = list(self.kv[pair[0]])
        computed = req.num_computed
        self.reqs[child] = Request(req.tokens[:computed], computed, computed)

    @precondition(lambda self: self.reqs)
    @rule(index=st.integers(0, 99))
    def finish(self, index: int) -> None:
        rid = self.pick(index)
        self.mgr.free(rid)
        del self.reqs[rid]

    @rule(n=st.integers(1, 4))
    def pressure(self, n: int) -> None:
        if n <= self.mgr.num_free_blocks:
            self.raw.append(self.mgr.pool.allocate(n))
            for block in self.raw[-1]:
                self.kv[block.block_id] = [GARBAGE] * BS

    @precondition(lambda self: self.raw)
    @rule(index=st.integers(0, 99))
    def release(self, index: int) -> None:
        self.mgr.pool.free(self.raw.pop(index % len(self.raw)))

    @rule(roll=st.integers(0, 3))
    def reset(self, roll: int) -> None:
        if roll:  # resetting wipes the cache: keep it rare so hits and evictions happen
            return
        idle = not self.raw and not any(self.mgr.block_table(rid) for rid in self.reqs)
        assert self.mgr.pool.reset_prefix_cache() is idle

    @invariant()
    def blocks_are_consistent(self) -> None:
        pool = self.mgr.pool
        refs = [0] * pool.num_blocks
        for handle in [self.mgr.block_table(rid) for rid in self.reqs] + [
            [block.block_id for block in raw] for raw in self.raw
        ]:
            for block_id in handle:
                refs[block_id] += 1
        assert [block.ref_cnt for block in pool.blocks] == refs
        free = free_ids(self.mgr)
        assert sorted(free) == [i for i, r in enumerate(refs) if r == 0]
        assert pool.num_free_blocks == len(free) == pool.num_blocks - sum(r > 0 for r in refs)
        hashed = [block for block in pool.blocks if block.block_hash is not None]
        assert len(pool._cached) == len(hashed)
        for block_hash, block in pool._cached.items():
            assert block.block_hash == block_hash
            assert self.kv[block.block_id] == list(block.token_ids)  # cached KV is right
        stats = self.mgr.stats()
        assert stats["prefix_cache_hits"] <= stats["prefix_cache_queries"]

    @invariant()
    def requests_match_their_tables(self) -> None:
        for rid, req in self.reqs.items():
            table = self.mgr.block_table(rid)
            assert len(table) == -(-req.num_slots // BS)
            for pos in range(req.num_computed):
                assert self.kv[table[pos // BS]][pos % BS] == req.tokens[pos]
            # A registered block sits where the request's own chained hash says it should.
            # (An unregistered full block is fine: another block held its hash at commit.)
            hashes = hash_blocks(req.tokens[: req.num_computed], BS, b"m")
            for i, (block_id, block_hash) in enumerate(zip(table, hashes)):
                block = self.mgr.pool.blocks[block_id]
                if block.block_hash is not None:
                    assert block.block_hash == block_hash
                    assert block.token_ids == tuple(req.tokens[i * BS : (i + 1) * BS])

    def teardown(self) -> None:
        for rid in list(self.reqs):
            self.mgr.free(rid)
        for raw in self.raw:
            self.mgr.pool.free(raw)
        assert self.mgr.num_free_blocks == self.mgr.pool.num_blocks


class NoCachingMachine(ManagerMachine):
    caching = False


MACHINE_SETTINGS = settings(max_examples=150, stateful_step_count=80, deadline=None)
TestManagerMachine = ManagerMachine.TestCase
TestManagerMachine.settings = MACHINE_SETTINGS
TestNoCachingMachine = NoCachingMachine.TestCase
TestNoCachingMachine.settings = settings(MACHINE_SETTINGS, max_examples=60)
