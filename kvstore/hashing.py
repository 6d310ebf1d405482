"""Stable, chained hashes of full KV blocks.

A block's hash covers its parent's hash, an extra key (such as the model id) and its token ids,
so equal hashes mean equal prefixes. The hash is xxh3-64 over a fixed little-endian byte layout:
identical in every process and on every machine (never Python's salted ``hash()``), which the
cluster-wide prefix index relies on.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from functools import cache

import xxhash

ROOT_HASH: int = 0
"""Parent hash of a prompt's first block (when no cache salt isolates it)."""

_HEADER = struct.Struct("<QQ")


@cache
def _tokens_layout(num_tokens: int) -> struct.Struct:
    return struct.Struct(f"<{num_tokens}q")


def hash_block(parent_hash: int, token_ids: Sequence[int], extra_key: bytes = b"") -> int:
    """Hash one block: parent (8 bytes), extra key (length-prefixed), token ids (int64 each)."""
    payload = (
        _HEADER.pack(parent_hash, len(extra_key))
        + extra_key
        + _tokens_layout(len(token_ids)).pack(*token_ids)
    )
    return xxhash.xxh3_64_intdigest(payload)


def salted_root(salt: str | None) -> int:
    """The parent hash of a prompt's first block under a cache salt (a tenant's, a request's
    `cache_salt`, or both joined): prompts under different salts share no block hash, so no
    cache anywhere (worker, prefix index, block store) lets one see the other's prefixes."""
    if not salt:
        return ROOT_HASH
    return xxhash.xxh3_64_intdigest(b"manta-cache-salt\0" + salt.encode("utf-8", "surrogatepass"))


def hash_blocks(
    token_ids: Sequence[int],
    block_size: int,
    extra_key: bytes = b"",
    parent_hash: int = ROOT_HASH,
) -> list[int]:
    """Chained hashes of each full block of ``token_ids``; a trailing partial block gets none."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    hashes: list[int] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent_hash = hash_block(parent_hash, token_ids[start : start + block_size], extra_key)
        hashes.append(parent_hash)
    return hashes


def extend_block_hashes(
    hashes: list[int],
    token_ids: Sequence[int],
    block_size: int,
    extra_key: bytes = b"",
    root: int = ROOT_HASH,
) -> None:
    """Append to ``hashes`` (the chained hashes of ``token_ids``' leading full blocks) the
    hashes of the full blocks after them: a growing sequence is hashed once, a block at a time.
    ``root``: the first block's parent (``salted_root``)."""
    parent = hashes[-1] if hashes else root
    for start in range(len(hashes) * block_size, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start : start + block_size], extra_key)
        hashes.append(parent)
