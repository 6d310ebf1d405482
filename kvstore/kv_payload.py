"""One KV block as it travels between workers, sealed so no one without the secret can forge it.

A payload holds its block hash, dtype, shape, the tensor bytes and an HMAC-SHA256 over all of
them plus the block's token ids, keyed by the cluster's KV-store secret. The token ids are not
stored: the loading worker knows the tokens it wants and recomputes the MAC over them, so a
payload of another prompt, changed bytes (random or NaN) or a changed header all fail the
check, and the store never holds a prompt in clear. The header is JSON (never pickled);
`decode` raises `PayloadError` for anything malformed, which the caller counts as a miss.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass


class PayloadError(ValueError):
    """A stored entry that does not parse as a payload."""


def payload_mac(
    secret: bytes,
    block_hash: int,
    token_ids: Sequence[int],
    dtype: str,
    shape: Sequence[int],
    data: bytes,
) -> bytes:
    """HMAC-SHA256 over a fixed layout of everything a loader relies on."""
    mac = hmac.new(secret, digestmod=hashlib.sha256)
    mac.update(struct.pack("<QI", block_hash, len(token_ids)))
    mac.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    mac.update(struct.pack("<I", len(dtype)) + dtype.encode())
    mac.update(struct.pack(f"<I{len(shape)}q", len(shape), *shape))
    mac.update(data)
    return mac.digest()


@dataclass(slots=True)
class BlockPayload:
    block_hash: int
    dtype: str  # torch dtype name, e.g. "float32"
    shape: tuple[int, ...]  # [layers, 2, block_size, kv_heads, head_dim]
    data: bytes
    mac: bytes  # payload_mac(secret, block_hash, the block's token ids, dtype, shape, data)

    @classmethod
    def seal(
        cls,
        secret: bytes,
        block_hash: int,
        token_ids: Sequence[int],
        dtype: str,
        shape: tuple[int, ...],
        data: bytes,
    ) -> BlockPayload:
        mac = payload_mac(secret, block_hash, token_ids, dtype, shape, data)
        return cls(block_hash, dtype, shape, data, mac)

    def verify(self, secret: bytes, block_hash: int, token_ids: Sequence[int]) -> bool:
        """Whether this payload is the sealed KV of exactly this block and these tokens."""
        expected = payload_mac(secret, block_hash, token_ids, self.dtype, self.shape, self.data)
        return self.block_hash == block_hash and hmac.compare_digest(expected, self.mac)

    def encode(self) -> bytes:
        header = {
            "hash": self.block_hash,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "mac": self.mac.hex(),
        }
        return json.dumps(header).encode() + b"\n" + self.data

    @classmethod
    def decode(cls, raw: bytes) -> BlockPayload:
        head, sep, data = raw.partition(b"\n")
        try:
            header = json.loads(head)
            payload = cls(
                int(header["hash"]),
                str(header["dtype"]),
                tuple(int(d) for d in header["shape"]),
                data,
                bytes.fromhex(header["mac"]),
            )
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            raise PayloadError(f"malformed KV payload: {type(error).__name__}") from None
        if not sep:
            raise PayloadError("malformed KV payload: no header")
        if not 0 <= payload.block_hash < 2**64 or not all(0 <= d < 2**31 for d in payload.shape):
            raise PayloadError("malformed KV payload: hash or shape out of range")
        return payload
