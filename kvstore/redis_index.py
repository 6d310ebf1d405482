"""The prefix index in Redis, shared by every node of the cluster.

Layout under `manta:{namespace}:` (one namespace per model, so models never mix):
`block:{hash}` is the set of workers holding a block, `worker:{id}` the set of a worker's
hashes (to forget them all at once), and `live` a sorted set of worker -> last-seen time.
Liveness uses the nodes' wall clocks, so they must agree to well within `ttl_s` (NTP does).

Redis is an accelerator, never a point of failure: every call has short socket timeouts and no
retries; when Redis fails, `match` answers {} and writes are dropped, a warning is logged at
most every `WARN_INTERVAL_S`, and Redis is not tried again for `retry_interval_s`, so a dead
server costs requests nothing. The connection pool reconnects once Redis is back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from kvstore.events import BlockStored, KVEvent
from kvstore.index import DEFAULT_TTL_S, PrefixIndex, longest_prefixes

logger = logging.getLogger(__name__)

WARN_INTERVAL_S = 30.0
"""Least time between two "Redis unreachable" warnings."""

_T = TypeVar("_T")

# Forgets a worker atomically: unless forced, only if its last-seen time is still at or
# before the cutoff, so a worker that heartbeats again in the meantime keeps its blocks.
# KEYS: live, worker set. ARGV: worker id, cutoff, block key prefix, force.
_FORGET_SCRIPT = """
if ARGV[4] ~= '1' then
  local seen = redis.call('ZSCORE', KEYS[1], ARGV[1])
  if seen and tonumber(seen) > tonumber(ARGV[2]) then return 0 end
end
for _, block_hash in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  redis.call('SREM', ARGV[3] .. block_hash, ARGV[1])
end
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[1], ARGV[1])
return 1
"""


class RedisPrefixIndex(PrefixIndex):
    """`PrefixIndex` over `redis.asyncio`: one round trip per publish, heartbeat and match."""

    def __init__(
        self,
        url: str,
        namespace: str,
        ttl_s: float = DEFAULT_TTL_S,
        *,
        socket_timeout_s: float = 0.2,
        retry_interval_s: float = 1.0,
        clock: Callable[[], float] = time.time,
    ):
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        if not namespace:
            raise ValueError("namespace must be non-empty")
        self._namespace = namespace
        self._ttl_s = ttl_s
        self._retry_interval_s = retry_interval_s
        self._clock = clock
        self._prefix = f"manta:{namespace}:"
        self._live_key = self._prefix + "live"
        self._block_prefix = self._prefix + "block:"
        self._redis = aioredis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=socket_timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        self._forget = self._redis.register_script(_FORGET_SCRIPT)
        self._down_until = 0.0
        self._last_warning = float("-inf")
        self._failing = False
        self._lost_events = False  # a call failed since the last heartbeat

    async def publish(self, worker_id: str, events: Sequence[KVEvent]) -> None:
        worker_key = self._worker_key(worker_id)
        pipe = self._redis.pipeline(transaction=False)
        pipe.zadd(self._live_key, {worker_id: self._clock()})
        for event in events:
            if not event.block_hashes:
                continue
            members = [str(block_hash) for block_hash in event.block_hashes]
            if isinstance(event, BlockStored):
                for member in members:
                    pipe.sadd(self._block_prefix + member, worker_id)
                pipe.sadd(worker_key, *members)
            else:
                for member in members:
                    pipe.srem(self._block_prefix + member, worker_id)
                pipe.srem(worker_key, *members)
        await self._guarded(pipe.execute)

    async def heartbeat(self, worker_id: str) -> bool:
        now = self._clock()
        cutoff = now - self._ttl_s
        pipe = self._redis.pipeline(transaction=False)
        pipe.zadd(self._live_key, {worker_id: now})
        pipe.zrangebyscore(self._live_key, "-inf", cutoff)
        replies = await self._guarded(pipe.execute)
        if replies is None:
            return True  # nothing to publish again while Redis is away
        # Events published while Redis was away were dropped; a restarted Redis is empty.
        known = replies[0] == 0 and not self._lost_events
        self._lost_events = False
        # Lazy cleanup: each heartbeat sweeps workers that stopped beating.
        for stale in replies[1]:
            await self._guarded(lambda stale=stale: self._forget_worker(stale, cutoff, False))
        return known

    async def remove_worker(self, worker_id: str) -> None:
        await self._guarded(lambda: self._forget_worker(worker_id, self._clock(), True))

    async def match(self, block_hashes: Sequence[int]) -> dict[str, int]:
        if not block_hashes:
            return {}
        cutoff = self._clock() - self._ttl_s
        pipe = self._redis.pipeline(transaction=False)
        pipe.zrangebyscore(self._live_key, f"({cutoff!r}", "+inf")
        for block_hash in block_hashes:
            pipe.smembers(f"{self._block_prefix}{block_hash}")
        replies = await self._guarded(pipe.execute)
        if replies is None:
            return {}
        live = set(replies[0])
        return longest_prefixes(replies[1:], live.__contains__)

    async def describe(self) -> dict:
        """Asks Redis itself (not the back-off state), so it tells whether Redis answers now."""
        try:
            workers = await self._redis.zrange(self._live_key, 0, -1)
            pipe = self._redis.pipeline(transaction=False)
            for worker in workers:
                pipe.scard(self._worker_key(worker))
            entries = sum(await pipe.execute()) if workers else 0
        except (RedisError, OSError):
            return {"backend": "redis", "reachable": False, "workers": None, "entries": None}
        return {"backend": "redis", "reachable": True, "workers": len(workers), "entries": entries}

    async def close(self) -> None:
        await self._redis.aclose()

    def _worker_key(self, worker_id: str) -> str:
        return f"{self._prefix}worker:{worker_id}"

    def _forget_worker(self, worker_id: str, cutoff: float, force: bool) -> Awaitable[int]:
        return self._forget(
            keys=[self._live_key, self._worker_key(worker_id)],
            args=[worker_id, repr(cutoff), self._block_prefix, "1" if force else "0"],
        )

    async def _guarded(self, call: Callable[[], Awaitable[_T]]) -> _T | None:
        """Run one Redis round trip; on failure return None and back off instead of raising."""
        if time.monotonic() < self._down_until:
            return None
        try:
            result = await call()
        except (RedisError, OSError) as exc:
            self._on_failure(exc)
            return None
        if self._failing:
            self._failing = False
            logger.info("Redis prefix index %r is reachable again", self._namespace)
        return result

    def _on_failure(self, exc: Exception) -> None:
        now = time.monotonic()
        self._failing = True
        self._lost_events = True
        self._down_until = now + self._retry_interval_s
        if now - self._last_warning >= WARN_INTERVAL_S:
            self._last_warning = now
            logger.warning(
                "Redis prefix index %r unavailable (%s: %s); routing by load only until it "
                "is back, cache events are dropped meanwhile",
                self._namespace,
                type(exc).__name__,
                exc,
            )
