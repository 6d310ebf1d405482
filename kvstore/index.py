"""The cluster's prefix index: which worker holds which cached KV blocks.

Workers publish their block pools' stored/removed events; the router asks, for a prompt's
chained block hashes, how many leading blocks each live worker already holds. Because hashes
are chained, a worker's useful overlap ends at its first missing block. The in-memory index is
the default for a single node; `RedisPrefixIndex` shares one index across nodes.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence

from kvstore.events import BlockRemoved, BlockStored, KVEvent

DEFAULT_TTL_S = 30.0
"""A worker whose last heartbeat (or publish) is older than this stops counting."""


class PrefixIndex(ABC):
    """Async interface shared by the in-process and the Redis index.

    Publishing also counts as a heartbeat. Workers absent from `match`'s answer hold no leading
    block of the prompt (or are not alive); an index that cannot answer returns {}.
    """

    @abstractmethod
    async def publish(self, worker_id: str, events: Sequence[KVEvent]) -> None:
        """Apply one worker's batch of events, in order."""

    @abstractmethod
    async def heartbeat(self, worker_id: str) -> bool:
        """Mark the worker alive now. False when the index had lost it (it started empty,
        expired the worker, or was unreachable since): the worker publishes its blocks again."""

    @abstractmethod
    async def remove_worker(self, worker_id: str) -> None:
        """Forget the worker and every block it held."""

    @abstractmethod
    async def match(self, block_hashes: Sequence[int]) -> dict[str, int]:
        """Number of leading blocks of `block_hashes` each live worker holds (absent: none)."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections; the index is unusable afterwards."""

    @abstractmethod
    async def describe(self) -> dict:
        """For `manta status`: {"backend", "reachable", "workers", "entries"} (entries: the
        (block, worker) pairs held; None when the backend could not say)."""


def longest_prefixes(
    holders_per_block: Iterable[Iterable[str]], live: Callable[[str], bool]
) -> dict[str, int]:
    """Walk the chain, dropping each worker at its first miss; workers not `live` never count."""
    matched: dict[str, int] = {}
    candidates: set[str] | None = None
    for depth, holders in enumerate(holders_per_block, start=1):
        if candidates is None:
            candidates = {worker for worker in holders if live(worker)}
        else:
            candidates.intersection_update(holders)
        if not candidates:
            break
        for worker in candidates:
            matched[worker] = depth
    return matched


class InMemoryPrefixIndex(PrefixIndex):
    """One process's index: hash -> workers and worker -> hashes, both plain dicts of sets.

    Every method runs without awaiting, so calls on one event loop never interleave.
    `clock` returns seconds; tests inject a fake one to expire workers without sleeping.
    """

    def __init__(self, ttl_s: float = DEFAULT_TTL_S, clock: Callable[[], float] = time.time):
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        self._ttl_s = ttl_s
        self._clock = clock
        self._holders: dict[int, set[str]] = {}
        self._blocks: dict[str, set[int]] = {}
        self._last_seen: dict[str, float] = {}

    async def publish(self, worker_id: str, events: Sequence[KVEvent]) -> None:
        self._last_seen[worker_id] = self._clock()
        blocks = self._blocks.setdefault(worker_id, set())
        for event in events:
            if isinstance(event, BlockStored):
                for block_hash in event.block_hashes:
                    self._holders.setdefault(block_hash, set()).add(worker_id)
                blocks.update(event.block_hashes)
            elif isinstance(event, BlockRemoved):
                for block_hash in event.block_hashes:
                    self._drop_holder(block_hash, worker_id)
                blocks.difference_update(event.block_hashes)

    async def heartbeat(self, worker_id: str) -> bool:
        now = self._clock()
        known = worker_id in self._last_seen  # not yet swept: its blocks are all still here
        self._last_seen[worker_id] = now
        # Lazy cleanup: each heartbeat sweeps workers that stopped beating.
        cutoff = now - self._ttl_s
        for worker, seen in list(self._last_seen.items()):
            if seen <= cutoff:
                self._forget(worker)
        return known

    async def remove_worker(self, worker_id: str) -> None:
        self._forget(worker_id)

    async def match(self, block_hashes: Sequence[int]) -> dict[str, int]:
        cutoff = self._clock() - self._ttl_s
        empty: frozenset[str] = frozenset()
        return longest_prefixes(
            (self._holders.get(block_hash, empty) for block_hash in block_hashes),
            lambda worker: self._last_seen.get(worker, cutoff) > cutoff,
        )

    async def describe(self) -> dict:
        entries = sum(len(blocks) for blocks in self._blocks.values())
        return {"backend": "in-process", "reachable": True, "workers": len(self._last_seen),
                "entries": entries}  # fmt: skip

    async def close(self) -> None:
        self._holders.clear()
        self._blocks.clear()
        self._last_seen.clear()

    def _drop_holder(self, block_hash: int, worker_id: str) -> None:
        holders = self._holders.get(block_hash)
        if holders is not None:
            holders.discard(worker_id)
            if not holders:
                del self._holders[block_hash]

    def _forget(self, worker_id: str) -> None:
        self._last_seen.pop(worker_id, None)
        for block_hash in self._blocks.pop(worker_id, ()):
            self._drop_holder(block_hash, worker_id)


def make_index(
    url: str | None, namespace: str, ttl_s: float = DEFAULT_TTL_S, socket_timeout_s: float = 0.2
) -> PrefixIndex:
    """The Redis index when a URL is given (shared by every node), else the in-process one.
    `socket_timeout_s` bounds each Redis call: what a silent Redis costs the caller."""
    if url is None:
        return InMemoryPrefixIndex(ttl_s=ttl_s)
    # Imported here because redis_index builds on this module.
    from kvstore.redis_index import RedisPrefixIndex

    return RedisPrefixIndex(url, namespace, ttl_s=ttl_s, socket_timeout_s=socket_timeout_s)
