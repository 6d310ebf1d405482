"""Per-request block tables on top of the block pool, with prefix matching.

The scheduler talks only to ``KVCacheManager``: it matches a new request's prompt against the
prefix cache, grows each request's table as tokens are scheduled, commits computed tokens (which
registers newly full blocks in the cache) and rolls back, forks or frees tables. Block hashes
come from the request (`Request.block_hashes`, computed once as its tokens arrive); only
computed, full blocks are ever cached.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from kvstore.events import KVEvent
from workers.block_pool import BlockPool, KVBlock


@dataclass(slots=True)
class PrefixMatch:
    """The leading cached blocks of a prompt, from ``match_prefix``.

    Valid until the pool next allocates (an allocation may evict a matched free block), so match
    right before ``allocate_slots``. ``block_hashes`` lets ``allocate_slots`` detect a stale
    match; ``num_query_tokens`` (the prompt length) is what the query counter adds.
    """

    blocks: list[KVBlock]
    num_cached_tokens: int
    block_hashes: list[int] = field(default_factory=list)
    num_query_tokens: int = 0


@dataclass(slots=True)
class _RequestBlocks:
    """One request's table: its blocks, their ids, how many lead blocks are in the cache."""

    blocks: list[KVBlock]
    block_ids: list[int]
    num_cached_blocks: int
    num_computed_tokens: int
    num_synced: int = 0  # leading block ids unchanged since the table was last read


class KVCacheManager:
    """Block tables keyed by request id; prefix caching follows ``pool.enable_caching``.

    Prefix-cache queries and hits are counted in tokens when a request's first ``allocate_slots``
    takes its ``PrefixMatch``: queries grow by the matched prompt's length, hits by its cached
    tokens. The pool's own lookup counters are fed in blocks at the same moment.
    """

    __slots__ = ("pool", "block_size", "_requests", "_queries", "_hits")

    def __init__(self, pool: BlockPool, block_size: int) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.pool = pool
        self.block_size = block_size
        self._requests: dict[str, _RequestBlocks] = {}
        self._queries = 0
        self._hits = 0

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def match_prefix(self, token_ids: Sequence[int], block_hashes: Sequence[int]) -> PrefixMatch:
        """Longest run of leading full blocks found in the cache; takes no references.

        ``block_hashes`` are the chained hashes of the leading full blocks of ``token_ids``. At
        most ``len(token_ids) - 1`` tokens come from the cache: the last prompt token is
        always computed, since its logits are needed.
        """
        num_tokens = len(token_ids)
        blocks: list[KVBlock] = []
        if self.pool.enable_caching:
            size = self.block_size
            for index in range(min(max(0, num_tokens - 1) // size, len(block_hashes))):
                block = self.pool.lookup(
                    block_hashes[index], token_ids[index * size : (index + 1) * size]
                )
                if block is None:
                    break
                blocks.append(block)
        hashes = list(block_hashes[: len(blocks)])
        return PrefixMatch(blocks, len(blocks) * self.block_size, hashes, num_tokens)

    def allocate_slots(
        self, request_id: str, num_tokens: int, prefix: PrefixMatch | None = None
    ) -> bool:
        """Grow the request's table to hold ``num_tokens`` slots in total.

        ``prefix`` is taken on the request's first call only: its blocks head the table and its
        tokens count as computed. Returns False, changing nothing, if the pool is short of
        blocks (matched blocks that are currently free count as consumed).
        """
        state = self._requests.get(request_id)
        if state is not None:
            if prefix is not None:
                raise ValueError(f"request {request_id!r} already has blocks; prefix not taken")
            if num_tokens <= len(state.blocks) * self.block_size:
                return True  # the common decode step: the last block still has room
            num_needed = -(-num_tokens // self.block_size)
            num_new = num_needed - len(state.blocks)
            if num_new > self.pool.num_free_blocks:
                return False
        else:
            num_needed = -(-num_tokens // self.block_size)
            cached = prefix.blocks if prefix is not None else []
            num_new = max(0, num_needed - len(cached))
            num_revived = sum(1 for block in cached if block.ref_cnt == 0)
            if num_new + num_revived > self.pool.num_free_blocks:
                return False
            state = self._admit(request_id, prefix)
        if num_new:
            new_blocks = self.pool.allocate(num_new)
            state.blocks.extend(new_blocks)
            state.block_ids.extend(block.block_id for block in new_blocks)
        return True

    def commit(
        self,
        request_id: str,
        token_ids: Sequence[int],
        num_computed_tokens: int,
        block_hashes: Sequence[int],
    ) -> None:
        """Record that the first ``num_computed_tokens`` of ``token_ids`` have KV written.

        ``token_ids`` holds all known tokens of the request (prompt and generated) and
        ``block_hashes`` their full blocks' chained hashes. Every block this fills is
        registered in the cache under its hash. Only steps that fill a block need a call.
        """
        state = self._requests[request_id]
        if not state.num_computed_tokens <= num_computed_tokens <= len(token_ids):
            raise ValueError(
                f"num_computed_tokens={num_computed_tokens} must lie in "
                f"[{state.num_computed_tokens}, {len(token_ids)}]"
            )
        size = self.block_size
        if num_computed_tokens > len(state.blocks) * size:
            raise ValueError(f"{num_computed_tokens} tokens exceed the allocated slots")
        state.num_computed_tokens = num_computed_tokens
        num_full = num_computed_tokens // size
        if num_full > state.num_cached_blocks and self.pool.enable_caching:
            if len(block_hashes) < num_full:
                raise ValueError(f"{len(block_hashes)} block hashes for {num_full} full blocks")
            for index in range(state.num_cached_blocks, num_full):
                chunk = token_ids[index * size : (index + 1) * size]
                self.pool.cache_block(state.blocks[index], block_hashes[index], chunk)
            state.num_cached_blocks = num_full

    def truncate(self, request_id: str, num_tokens: int) -> None:
        """Shrink the table to the blocks ``num_tokens`` slots need, freeing the rest.

        Used to drop the slots of rejected draft tokens. Refuses to leave a cached or shared
        block partially kept, since the request would then overwrite KV that others read.
        """
        state = self._requests[request_id]
        if num_tokens < 0:
            raise ValueError(f"cannot truncate to {num_tokens} tokens")
        size = self.block_size
        num_full = num_tokens // size
        keep = -(-num_tokens // size)
        if keep > num_full and num_full < len(state.blocks):
            last = state.blocks[num_full]
            if last.block_hash is not None or last.ref_cnt > 1:
                raise ValueError(f"cannot truncate into cached or shared {last}")
        dropped = state.blocks[keep:]
        del state.blocks[keep:]
        del state.block_ids[keep:]
        state.num_synced = min(state.num_synced, keep)
        state.num_cached_blocks = min(state.num_cached_blocks, num_full)
        state.num_computed_tokens = min(state.num_computed_tokens, num_tokens)
        self.pool.free(reversed(dropped))

    def fork(self, parent_id: str, child_id: str) -> tuple[int, int] | None:
        """Give ``child_id`` the parent's computed KV: full blocks shared, a partial one copied.

        Returns ``(src_block_id, dst_block_id)`` for the caller to copy the partial block's KV,
        or None when there is none. Raises ``NoFreeBlocksError``, changing nothing, if the copy
        needs a block and none is free.
        """
        if child_id in self._requests:
            raise ValueError(f"request {child_id!r} already exists")
        parent = self._requests[parent_id]
        num_computed = parent.num_computed_tokens
        num_full = num_computed // self.block_size
        partial = num_full * self.block_size < num_computed
        fresh = self.pool.allocate(1) if partial else []
        shared = parent.blocks[:num_full]
        self.pool.touch(shared)
        blocks = shared + fresh
        self._requests[child_id] = _RequestBlocks(
            blocks,
            [block.block_id for block in blocks],
            min(parent.num_cached_blocks, num_full),
            num_computed,
        )
        return (parent.blocks[num_full].block_id, fresh[0].block_id) if partial else None

    def free(self, request_id: str) -> None:
        """Release the request's blocks tail first (evicted before a shared prompt head)."""
        state = self._requests.pop(request_id, None)
        if state is not None:
            self.pool.free(reversed(state.blocks))

    def block_table(self, request_id: str) -> list[int]:
        """A copy of the request's block ids, in token order."""
        return list(self._requests[request_id].block_ids)

    def sync_block_ids(self, request_id: str) -> tuple[int, list[int]]:
        """``(start, ids)``: the request's live block ids, of which those from index ``start``
        on changed since the previous call (for a model runner that keeps a copy up to date
        without copying whole tables every step). Read-only for the caller."""
        state = self._requests[request_id]
        start, state.num_synced = state.num_synced, len(state.block_ids)
        return min(start, len(state.block_ids)), state.block_ids

    def num_blocks_of(self, request_id: str) -> int:
        return len(self._requests[request_id].blocks)

    def stats(self) -> dict[str, int]:
        """Pool counters (blocks) plus prefix-cache queries and hits (tokens)."""
        stats = self.pool.stats()
        stats["prefix_cache_queries"] = self._queries
        stats["prefix_cache_hits"] = self._hits
        return stats

    def drain_events(self) -> list[KVEvent]:
        return self.pool.drain_events()

    def _admit(self, request_id: str, prefix: PrefixMatch | None) -> _RequestBlocks:
        """Create the request's table, taking references on the matched prefix blocks."""
        if prefix is None:
            state = _RequestBlocks([], [], 0, 0)
        else:
            for block, block_hash in zip(prefix.blocks, prefix.block_hashes, strict=True):
                if block.block_hash != block_hash:
                    raise ValueError(f"stale prefix match: {block} was evicted")
            self.pool.touch(prefix.blocks)
            state = _RequestBlocks(
                list(prefix.blocks),
                [block.block_id for block in prefix.blocks],
                len(prefix.blocks),
                prefix.num_cached_tokens,
            )
            self._queries += prefix.num_query_tokens
            self._hits += prefix.num_cached_tokens
            num_queryable = max(0, prefix.num_query_tokens - 1) // self.block_size
            self.pool.record_lookups(num_queryable, len(prefix.blocks))
        self._requests[request_id] = state
        return state
