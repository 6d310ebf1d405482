"""API keys, the tenant each one names, and per-tenant request rate limits.

A key is given as `KEY[:TENANT]` (`manta serve --api-key`, `MANTA_API_KEYS` comma-separated);
a key without a tenant is a tenant of its own, named by a digest of the key so the name never
reveals it. Every configured key is compared with `hmac.compare_digest`, with no early exit,
so response time says nothing about how much of a guess was right.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Iterable
from dataclasses import dataclass


class AuthenticationError(Exception):
    """No key, or a key that is not configured (HTTP 401)."""


class RateLimitedError(Exception):
    """The tenant is over its request rate (HTTP 429 with Retry-After)."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"rate limit reached; retry in {retry_after_s:.1f} s")
        self.retry_after_s = retry_after_s


def parse_api_keys(specs: Iterable[str]) -> dict[str, str]:
    """key -> tenant from `KEY[:TENANT]` specs (and comma-separated lists of them)."""
    keys: dict[str, str] = {}
    for spec in specs:
        for item in spec.split(","):
            item = item.strip()
            if not item:
                continue
            key, _, tenant = item.partition(":")
            if len(key) < 8:
                raise ValueError("an API key must have at least 8 characters")
            keys[key] = tenant or "key-" + hashlib.sha256(key.encode()).hexdigest()[:12]
    return keys


class Authenticator:
    def __init__(self, keys: dict[str, str]) -> None:
        self._keys = [(key.encode(), tenant) for key, tenant in keys.items()]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def tenant(self, authorization: str | None) -> str | None:
        """The tenant of a `Bearer KEY` header; None when no keys are configured."""
        if not self._keys:
            return None
        scheme, _, given = (authorization or "").partition(" ")
        offered = given.strip().encode() if scheme.lower() == "bearer" else b""
        found = None
        for key, tenant in self._keys:  # every key compared: timing never tells which
            if hmac.compare_digest(key, offered) and offered:
                found = tenant
        if found is None:
            raise AuthenticationError(
                "Incorrect API key provided. Send it as `Authorization: Bearer KEY`."
            )
        return found


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """A token bucket per tenant: `rate` requests per second on average, `burst` at once."""

    def __init__(self, rate: float | None, burst: int, clock=time.monotonic) -> None:
        self.rate, self.burst, self._clock = rate, burst, clock
        self._buckets: dict[str, _Bucket] = {}

    def admit(self, tenant: str | None) -> None:
        """Take one request from the tenant's bucket, or raise RateLimitedError."""
        if self.rate is None:
            return
        now = self._clock()
        bucket = self._buckets.setdefault(tenant or "", _Bucket(float(self.burst), now))
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
        bucket.updated = now
        if bucket.tokens < 1:
            raise RateLimitedError((1 - bucket.tokens) / self.rate)
        bucket.tokens -= 1
