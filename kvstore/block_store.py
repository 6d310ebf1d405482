"""Shared KV block payloads in Redis: a hot system prompt is prefilled once in the cluster.

A worker that has computed the blocks of a prefix seen often enough publishes their KV (all
layers, keys and values) here; another worker that misses them locally can load them instead
of recomputing the prefill. Each entry carries its block hash, token ids, dtype and shape, so
a loader verifies what it got. The store is capped in bytes: the least recently used entries
go first. Like the prefix index, it degrades to "nothing found" when Redis is unreachable.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from kvstore.kv_payload import BlockPayload, PayloadError

logger = logging.getLogger(__name__)


class BlockStore:
    """Capped LRU of block payloads in Redis, namespaced per model."""

    def __init__(
        self,
        url: str,
        namespace: str,
        max_bytes: int = 512 * 2**20,
        socket_timeout_s: float = 0.5,
        retry_interval_s: float = 1.0,
    ) -> None:
        self._redis = aioredis.Redis.from_url(
            url,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=socket_timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        self._prefix = f"manta:{namespace}:kv:"
        self._lru_key = f"manta:{namespace}:kvlru"
        self._bytes_key = f"manta:{namespace}:kvbytes"
        self.max_bytes = max_bytes
        self._retry_interval_s = retry_interval_s
        self._down_until = 0.0
        self.num_corrupt = 0  # entries that did not parse

    def _key(self, block_hash: int) -> str:
        return f"{self._prefix}{block_hash}"

    async def put(self, payloads: Sequence[BlockPayload]) -> int:
        """Store payloads (skipping ones already there); returns how many were new."""
        if not payloads or not self._up():
            return 0
        try:
            encoded = [payload.encode() for payload in payloads]
            pipe = self._redis.pipeline(transaction=False)
            for payload, raw in zip(payloads, encoded):
                pipe.set(self._key(payload.block_hash), raw, nx=True)
            added = await pipe.execute()
            pipe = self._redis.pipeline(transaction=False)
            now = time.time()
            for payload in payloads:
                pipe.zadd(self._lru_key, {str(payload.block_hash): now})
            new_bytes = sum(len(raw) for raw, was_added in zip(encoded, added) if was_added)
            pipe.incrby(self._bytes_key, new_bytes)
            total = (await pipe.execute())[-1]
            if total > self.max_bytes:
                await self._evict(total - self.max_bytes)
            return sum(1 for a in added if a)
        except (RedisError, OSError) as error:
            self._fail(error)
            return 0

    async def get_many(self, block_hashes: Sequence[int]) -> list[BlockPayload | None]:
        """Payloads in order (None where absent), in one round trip; refreshes their LRU."""
        if not block_hashes or not self._up():
            return [None] * len(block_hashes)
        try:
            raws = await self._redis.mget([self._key(h) for h in block_hashes])
            found = {str(h): time.time() for h, raw in zip(block_hashes, raws) if raw}
            if found:
                await self._redis.zadd(self._lru_key, found, xx=True)
        except (RedisError, OSError) as error:
            self._fail(error)
            return [None] * len(block_hashes)
        return [self._decode(raw) if raw else None for raw in raws]

    def _decode(self, raw: bytes) -> BlockPayload | None:
        """A stored entry as a payload; a corrupt one is a miss, counted, never an error."""
        try:
            return BlockPayload.decode(raw)
        except PayloadError:
            self.num_corrupt += 1
            return None

    async def _evict(self, excess: int) -> None:
        """Drop least recently used entries, one at a time, until `excess` bytes are freed."""
        while excess > 0:
            oldest = await self._redis.zpopmin(self._lru_key, 1)
            if not oldest:
                return
            key = self._key(int(oldest[0][0]))
            pipe = self._redis.pipeline(transaction=False)
            pipe.strlen(key)
            pipe.delete(key)
            size = (await pipe.execute())[0]
            await self._redis.decrby(self._bytes_key, size)
            excess -= max(size, 1)

    def _up(self) -> bool:
        return time.monotonic() >= self._down_until

    def _fail(self, error: Exception) -> None:
        if self._up():
            logger.warning("KV block store unavailable (%s); recomputing instead", error)
        self._down_until = time.monotonic() + self._retry_interval_s

    async def close(self) -> None:
        await self._redis.aclose()
