"""One KV block as it travels between workers: its hash, token ids, dtype, shape and bytes.

Plain data with a JSON header (never pickled), so the engine can make and check payloads
without importing the Redis client that stores them (kvstore/block_store.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass(slots=True)
class BlockPayload:
    block_hash: int
    token_ids: tuple[int, ...]
    dtype: str  # torch dtype name, e.g. "float32"
    shape: tuple[int, ...]  # [layers, 2, block_size, kv_heads, head_dim]
    data: bytes

    def encode(self) -> bytes:
        header = {
            "hash": self.block_hash,
            "tokens": list(self.token_ids),
            "dtype": self.dtype,
            "shape": list(self.shape),
        }
        return json.dumps(header).encode() + b"\n" + self.data

    @classmethod
    def decode(cls, raw: bytes) -> BlockPayload:
        head, _, data = raw.partition(b"\n")
        header = json.loads(head)
        return cls(
            header["hash"], tuple(header["tokens"]), header["dtype"], tuple(header["shape"]), data
        )
