"""The KV block allocator: a fixed pool of blocks, an LRU free queue and the prefix-cache map.

Every block is either free (``ref_cnt == 0``, in the free queue) or referenced (out of it). A
freed block keeps its hash, so a later request can still hit it until the block is reallocated;
the free queue's head is the least recently used block, evicted first.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from kvstore.events import BlockRemoved, BlockStored, KVEvent


class NoFreeBlocksError(RuntimeError):
    """More blocks were requested than the pool has free."""


class KVBlock:
    """One KV block: its id, reference count, cache identity and free-queue links."""

    __slots__ = ("block_id", "ref_cnt", "block_hash", "token_ids", "prev_free", "next_free")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: int | None = None
        self.token_ids: tuple[int, ...] | None = None
        self.prev_free: KVBlock | None = None
        self.next_free: KVBlock | None = None

    def __repr__(self) -> str:
        return f"KVBlock(id={self.block_id}, ref_cnt={self.ref_cnt}, hash={self.block_hash})"


class FreeBlockQueue:
    """Intrusive doubly linked list of free blocks: O(1) pop, append and unlink, no allocation.

    Two sentinel blocks bound the list, so every queued block has both links set and a block
    outside the queue has neither.
    """

    __slots__ = ("_head", "_tail", "_len")

    def __init__(self, blocks: Iterable[KVBlock] = ()) -> None:
        self._head = KVBlock(-1)
        self._tail = KVBlock(-1)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self._len = 0
        for block in blocks:
            self.append(block)

    def __len__(self) -> int:
        return self._len

    def popleft(self) -> KVBlock:
        """Unlink and return the least recently used block."""
        block = self._head.next_free
        if block is self._tail or block is None:
            raise NoFreeBlocksError("the free block queue is empty")
        self.remove(block)
        return block

    def append(self, block: KVBlock) -> None:
        """Link ``block`` at the tail (most recently used)."""
        if block.prev_free is not None:
            raise ValueError(f"{block} is already in the free queue")
        last = self._tail.prev_free
        assert last is not None
        block.prev_free = last
        block.next_free = self._tail
        last.next_free = block
        self._tail.prev_free = block
        self._len += 1

    def appendleft(self, block: KVBlock) -> None:
        """Link ``block`` at the head (the next to be taken)."""
        if block.prev_free is not None:
            raise ValueError(f"{block} is already in the free queue")
        first = self._head.next_free
        assert first is not None
        block.prev_free = self._head
        block.next_free = first
        first.prev_free = block
        self._head.next_free = block
        self._len += 1

    def remove(self, block: KVBlock) -> None:
        """Unlink ``block`` from anywhere in the queue."""
        prev, nxt = block.prev_free, block.next_free
        if prev is None or nxt is None:
            raise ValueError(f"{block} is not in the free queue")
        prev.next_free = nxt
        nxt.prev_free = prev
        block.prev_free = block.next_free = None
        self._len -= 1

    def blocks(self) -> Iterator[KVBlock]:
        """Iterate from head (next to evict) to tail."""
        block = self._head.next_free
        while block is not self._tail and block is not None:
            yield block
            block = block.next_free


class BlockPool:
    """A fixed set of ``num_blocks`` KV blocks, created once, with an optional prefix cache.

    Cache lookups and hits are counted in blocks by the caller through ``record_lookups``, since
    only the caller knows which lookups make up one prefix query.
    """

    __slots__ = (
        "num_blocks",
        "enable_caching",
        "blocks",
        "_free",
        "_cached",
        "_events",
        "_allocation_calls",
        "_allocated_blocks",
        "_evictions",
        "_cache_lookups",
        "_cache_hits",
    )

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self._free = FreeBlockQueue(self.blocks)
        self._cached: dict[int, KVBlock] = {}
        # Pending events as (kind, hashes) runs; consecutive events of one kind share a run.
        self._events: list[tuple[type[BlockStored] | type[BlockRemoved], list[int]]] = []
        self._allocation_calls = 0
        self._allocated_blocks = 0
        self._evictions = 0
        self._cache_lookups = 0
        self._cache_hits = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks with ``ref_cnt == 0``, cached or not."""
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by some request."""
        return 1.0 - len(self._free) / self.num_blocks

    def free_blocks(self) -> Iterator[KVBlock]:
        """Free blocks in eviction order (least recently used first)."""
        return self._free.blocks()

    def allocate(self, n: int) -> list[KVBlock]:
        """Take the ``n`` least recently used free blocks, evicting their cached hashes."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > len(self._free):
            raise NoFreeBlocksError(
                f"requested {n} blocks but only {len(self._free)} of {self.num_blocks} are free"
            )
        taken = []
        for _ in range(n):
            block = self._free.popleft()
            if block.block_hash is not None:
                self._evict(block)
            block.ref_cnt = 1
            taken.append(block)
        self._allocation_calls += 1
        self._allocated_blocks += n
        return taken

    def lookup(self, block_hash: int, token_ids: Sequence[int]) -> KVBlock | None:
        """The cached block with this hash and these exact token ids, if any; no side effects."""
        block = self._cached.get(block_hash)
        if block is None:
            return None
        tokens = token_ids if isinstance(token_ids, tuple) else tuple(token_ids)
        return block if block.token_ids == tokens else None

    def record_lookups(self, num_queried: int, num_hits: int) -> None:
        """Count one prefix query: ``num_queried`` blocks looked up, ``num_hits`` found."""
        self._cache_lookups += num_queried
        self._cache_hits += num_hits

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take one more reference on each block, reviving free (cached) ones."""
        for block in blocks:
            if block.ref_cnt == 0:
                self._free.remove(block)
            block.ref_cnt += 1

    def free(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one reference on each block in order. An unreferenced cached block joins the
        queue tail (most recently used); an uncached one the head, since it holds nothing
        worth keeping and reusing it first lets cached blocks survive longer."""
        for block in blocks:
            if block.ref_cnt <= 0:
                raise ValueError(f"double free of {block}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                if block.block_hash is None:
                    self._free.appendleft(block)
                else:
                    self._free.append(block)

    def cache_block(self, block: KVBlock, block_hash: int, token_ids: Sequence[int]) -> None:
        """Register a full, referenced block under ``block_hash``.

        If another block already holds the hash, this one simply stays uncached.
        """
        if block.ref_cnt <= 0:
            raise ValueError(f"cannot cache unreferenced {block}")
        if block.block_hash is not None:
            raise ValueError(f"{block} is already cached")
        if not self.enable_caching or block_hash in self._cached:
            return
        block.block_hash = block_hash
        block.token_ids = tuple(token_ids)
        self._cached[block_hash] = block
        self._emit(BlockStored, block_hash)

    def cached_hashes(self) -> list[int]:
        """The hash of every cached block (what a fresh prefix index must be told again)."""
        return list(self._cached)

    def drain_events(self) -> list[KVEvent]:
        """Events since the last drain, oldest first; consecutive ones of a kind are merged."""
        events: list[KVEvent] = [kind(tuple(hashes)) for kind, hashes in self._events]
        self._events.clear()
        return events

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; refused (False) while any block is referenced."""
        if len(self._free) != self.num_blocks:
            return False
        for block_hash, block in self._cached.items():
            self._emit(BlockRemoved, block_hash)
            block.block_hash = None
            block.token_ids = None
        self._cached.clear()
        return True

    def stats(self) -> dict[str, int]:
        """Counters in blocks."""
        return {
            "num_blocks": self.num_blocks,
            "num_free_blocks": len(self._free),
            "allocation_calls": self._allocation_calls,
            "allocated_blocks": self._allocated_blocks,
            "evictions": self._evictions,
            "cache_lookups": self._cache_lookups,
            "cache_hits": self._cache_hits,
        }

    def _evict(self, block: KVBlock) -> None:
        block_hash = block.block_hash
        assert block_hash is not None and self._cached.get(block_hash) is block
        del self._cached[block_hash]
        block.block_hash = None
        block.token_ids = None
        self._evictions += 1
        self._emit(BlockRemoved, block_hash)

    def _emit(self, kind: type[BlockStored] | type[BlockRemoved], block_hash: int) -> None:
        if self._events and self._events[-1][0] is kind:
            self._events[-1][1].append(block_hash)
        else:
            self._events.append((kind, [block_hash]))
