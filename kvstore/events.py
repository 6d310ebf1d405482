"""KV cache events that workers publish to the cluster's prefix index."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BlockStored:
    """Blocks with these hashes became cached on the publishing worker."""

    block_hashes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    """Blocks with these hashes were evicted from the publishing worker's cache."""

    block_hashes: tuple[int, ...]


KVEvent = BlockStored | BlockRemoved
