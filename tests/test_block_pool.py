"""Block pool: exact block ids and LRU order, eviction, events, collisions, errors."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from kvstore.events import BlockRemoved, BlockStored
from workers.block_pool import BlockPool, FreeBlockQueue, KVBlock, NoFreeBlocksError


def free_ids(pool: BlockPool) -> list[int]:
    return [block.block_id for block in pool.free_blocks()]


def ids(blocks: list[KVBlock]) -> list[int]:
    return [block.block_id for block in blocks]


def test_free_queue_operations() -> None:
    blocks = [KVBlock(i) for i in range(5)]
    queue = FreeBlockQueue(blocks)
    assert len(queue) == 5 and ids(list(queue.blocks())) == [0, 1, 2, 3, 4]
    queue.remove(blocks[2])
    assert ids(list(queue.blocks())) == [0, 1, 3, 4]
    assert blocks[2].prev_free is None and blocks[2].next_free is None
    assert queue.popleft() is blocks[0]
    queue.append(blocks[0])
    queue.append(blocks[2])
    assert ids(list(queue.blocks())) == [1, 3, 4, 0, 2] and len(queue) == 5
    queue.remove(blocks[2])  # the tail
    queue.remove(blocks[1])  # the head
    assert ids(list(queue.blocks())) == [3, 4, 0] and len(queue) == 3
    with pytest.raises(ValueError):
        queue.remove(blocks[1])
    with pytest.raises(ValueError):
        queue.append(blocks[3])
    for _ in range(3):
        queue.popleft()
    with pytest.raises(NoFreeBlocksError):
        queue.popleft()
    assert len(queue) == 0 and list(queue.blocks()) == []


def test_initial_state() -> None:
    pool = BlockPool(6)
    assert pool.num_blocks == 6 and pool.num_free_blocks == 6 and pool.usage == 0.0
    assert free_ids(pool) == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError):
        BlockPool(0)


def test_allocate_free_touch_order() -> None:
    pool = BlockPool(10)
    a = pool.allocate(3)
    assert ids(a) == [0, 1, 2] and all(block.ref_cnt == 1 for block in a)
    b = pool.allocate(2)
    assert ids(b) == [3, 4]
    assert free_ids(pool) == [5, 6, 7, 8, 9] and pool.usage == 0.5
    # Cached blocks go to the tail (most recently used) ...
    pool.cache_block(a[0], 100, [1])
    pool.cache_block(a[1], 101, [2])
    pool.free(reversed(a))
    # ... an uncached one to the head: it holds nothing worth keeping.
    assert free_ids(pool) == [2, 5, 6, 7, 8, 9, 1, 0]
    pool.free(b)
    assert free_ids(pool) == [4, 3, 2, 5, 6, 7, 8, 9, 1, 0]
    # A touch pulls a free block out of the middle of the queue.
    pool.touch([pool.blocks[1]])
    assert free_ids(pool) == [4, 3, 2, 5, 6, 7, 8, 9, 0] and pool.blocks[1].ref_cnt == 1
    # Touching a referenced block only bumps its count; it leaves the queue after its last free.
    pool.touch([pool.blocks[1]])
    pool.free([pool.blocks[1]])
    assert pool.blocks[1].ref_cnt == 1 and pool.num_free_blocks == 9
    pool.free([pool.blocks[1]])
    assert free_ids(pool) == [4, 3, 2, 5, 6, 7, 8, 9, 0, 1]
    assert ids(pool.allocate(4)) == [4, 3, 2, 5]


def test_lru_eviction_and_events() -> None:
    pool = BlockPool(4)
    a = pool.allocate(2)
    pool.cache_block(a[0], 100, [1, 2])
    pool.cache_block(a[1], 101, [3, 4])
    pool.free(reversed(a))
    assert free_ids(pool) == [2, 3, 1, 0]
    assert pool.lookup(100, [1, 2]) is a[0] and pool.lookup(101, (3, 4)) is a[1]
    assert pool.drain_events() == [BlockStored((100, 101))]
    assert pool.drain_events() == []
    # Uncached blocks 2 and 3 go first, then the least recently freed cached block (1).
    taken = pool.allocate(3)
    assert ids(taken) == [2, 3, 1]
    assert pool.lookup(101, [3, 4]) is None and pool.lookup(100, [1, 2]) is a[0]
    assert a[1].block_hash is None and a[1].token_ids is None
    pool.cache_block(taken[0], 102, [5, 6])
    pool.touch([a[0]])
    assert a[0].ref_cnt == 1 and pool.num_free_blocks == 0
    assert pool.drain_events() == [BlockRemoved((101,)), BlockStored((102,))]
    assert pool.stats() == {
        "num_blocks": 4,
        "num_free_blocks": 0,
        "allocation_calls": 2,
        "allocated_blocks": 5,
        "evictions": 1,
        "cache_lookups": 0,
        "cache_hits": 0,
    }


def test_hash_collision_never_matches_other_tokens() -> None:
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    pool.cache_block(a, 7, [1, 2, 3, 4])
    assert pool.lookup(7, [1, 2, 3, 5]) is None
    assert pool.lookup(7, [1, 2, 3, 4]) is a
    # A second block under the same hash stays uncached and leaves the map alone.
    pool.cache_block(b, 7, [1, 2, 3, 5])
    assert b.block_hash is None and b.token_ids is None
    assert pool.lookup(7, [1, 2, 3, 5]) is None and pool.lookup(7, [1, 2, 3, 4]) is a
    assert pool.drain_events() == [BlockStored((7,))]


def test_allocate_too_many_changes_nothing() -> None:
    pool = BlockPool(3)
    pool.allocate(2)
    before = (free_ids(pool), pool.stats())
    with pytest.raises(NoFreeBlocksError, match="requested 2 blocks but only 1 of 3"):
        pool.allocate(2)
    assert (free_ids(pool), pool.stats()) == before
    assert pool.allocate(0) == []
    with pytest.raises(ValueError):
        pool.allocate(-1)


def test_misuse_raises() -> None:
    pool = BlockPool(3)
    (block,) = pool.allocate(1)
    pool.free([block])
    with pytest.raises(ValueError, match="double free"):
        pool.free([block])
    with pytest.raises(ValueError, match="unreferenced"):
        pool.cache_block(block, 1, [1])
    (block,) = pool.allocate(1)
    pool.cache_block(block, 1, [1])
    with pytest.raises(ValueError, match="already cached"):
        pool.cache_block(block, 2, [2])


def test_reset_prefix_cache() -> None:
    pool = BlockPool(3)
    blocks = pool.allocate(2)
    pool.cache_block(blocks[0], 10, [1])
    pool.cache_block(blocks[1], 11, [2])
    assert pool.reset_prefix_cache() is False
    assert pool.lookup(10, [1]) is blocks[0]
    pool.free(blocks)
    pool.drain_events()
    assert pool.reset_prefix_cache() is True
    assert pool.lookup(10, [1]) is None and pool.lookup(11, [2]) is None
    assert all(block.block_hash is None for block in pool.blocks)
    assert pool.drain_events() == [BlockRemoved((10, 11))]
    assert pool.stats()["evictions"] == 0


def test_caching_disabled() -> None:
    pool = BlockPool(2, enable_caching=False)
    (block,) = pool.allocate(1)
    pool.cache_block(block, 5, [1, 2])
    assert block.block_hash is None and pool.lookup(5, [1, 2]) is None
    assert pool.drain_events() == []


def test_record_lookups() -> None:
    pool = BlockPool(2)
    pool.record_lookups(4, 3)
    pool.record_lookups(2, 0)
    assert pool.stats()["cache_lookups"] == 6 and pool.stats()["cache_hits"] == 3


class PoolMachine(RuleBasedStateMachine):
    """Random allocate/free/cache/hit/reset sequences against a list-based LRU model."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = BlockPool(8)
        self.free_order = list(range(8))  # model of the free queue, head first
        self.refs = [0] * 8
        self.cached: dict[int, tuple[int, tuple[int, ...]]] = {}  # hash -> (block id, tokens)
        self.handles: list[list[KVBlock]] = []  # each holds one reference per listed block
        self.events: list[tuple[type, list[int]]] = []

    def emit(self, kind: type, block_hash: int) -> None:
        if self.events and self.events[-1][0] is kind:
            self.events[-1][1].append(block_hash)
        else:
            self.events.append((kind, [block_hash]))

    @rule(n=st.integers(0, 5))
    def allocate(self, n: int) -> None:
        if n > len(self.free_order):
            with pytest.raises(NoFreeBlocksError):
                self.pool.allocate(n)
            return
        blocks = self.pool.allocate(n)
        expected, self.free_order = self.free_order[:n], self.free_order[n:]
        assert ids(blocks) == expected
        for block_id in expected:
            for block_hash, (cached_id, _) in list(self.cached.items()):
                if cached_id == block_id:
                    del self.cached[block_hash]
                    self.emit(BlockRemoved, block_hash)
            self.refs[block_id] = 1
        self.handles.append(blocks)

    @rule(index=st.integers(0, 20), reverse=st.booleans())
    def free(self, index: int, reverse: bool) -> None:
        if not self.handles:
            return
        blocks = self.handles.pop(index % len(self.handles))
        if reverse:
            blocks.reverse()
        self.pool.free(blocks)
        cached_ids = {block_id for block_id, _ in self.cached.values()}
        for block in blocks:
            self.refs[block.block_id] -= 1
            if self.refs[block.block_id] == 0:
                if block.block_id in cached_ids:
                    self.free_order.append(block.block_id)
                else:
                    self.free_order.insert(0, block.block_id)

    @rule(index=st.integers(0, 20), block_hash=st.integers(0, 5), token=st.integers(0, 2))
    def cache(self, index: int, block_hash: int, token: int) -> None:
        uncached = [
            block
            for handle in self.handles
            for block in handle
            if all(cached_id != block.block_id for cached_id, _ in self.cached.values())
        ]
        if not uncached:
            return
        block = uncached[index % len(uncached)]
        tokens = (token, block_hash)
        self.pool.cache_block(block, block_hash, tokens)
        if block_hash not in self.cached:
            self.cached[block_hash] = (block.block_id, tokens)
            self.emit(BlockStored, block_hash)

    @rule(block_hash=st.integers(0, 5), token=st.integers(0, 2))
    def hit(self, block_hash: int, token: int) -> None:
        tokens = (token, block_hash)
        found = self.pool.lookup(block_hash, list(tokens))
        entry = self.cached.get(block_hash)
        if entry is None or entry[1] != tokens:
            assert found is None
            return
        assert found is not None and found.block_id == entry[0]
        self.pool.touch([found])
        if self.refs[found.block_id] == 0:
            self.free_order.remove(found.block_id)
        self.refs[found.block_id] += 1
        self.handles.append([found])

    @rule()
    def reset(self) -> None:
        idle = not any(self.refs)
        assert self.pool.reset_prefix_cache() is idle
        if idle:
            for block_hash in self.cached:
                self.emit(BlockRemoved, block_hash)
            self.cached.clear()

    @rule()
    def drain(self) -> None:
        expected = [kind(tuple(hashes)) for kind, hashes in self.events]
        assert self.pool.drain_events() == expected
        self.events = []

    @invariant()
    def matches_model(self) -> None:
        pool = self.pool
        assert free_ids(pool) == self.free_order
        assert [block.ref_cnt for block in pool.blocks] == self.refs
        assert pool.num_free_blocks == self.refs.count(0)
        assert pool.num_free_blocks + sum(r > 0 for r in self.refs) == pool.num_blocks
        hashed = {
            b.block_hash: (b.block_id, b.token_ids) for b in pool.blocks if b.block_hash is not None
        }
        assert hashed == self.cached
        for block_hash, (block_id, tokens) in self.cached.items():
            assert pool.lookup(block_hash, tokens) is pool.blocks[block_id]

    def teardown(self) -> None:
        for handle in self.handles:
            self.pool.free(handle)
        assert self.pool.num_free_blocks == self.pool.num_blocks


PoolMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestPoolMachine = PoolMachine.TestCase
