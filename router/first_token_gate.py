"""How many requests may wait for their first token at once, learned from the TTFTs they get.

Workers shed what their step-time model says would miss the TTFT SLO, but a request reaches a
worker only after the ingress has parsed, tokenized and dispatched it; when arrivals outrun
what the HTTP and Ray layers themselves can carry, the time goes there, before any worker can
refuse. So the ingress keeps a limit on requests still awaiting their first token: it grows by
about one per limit's worth of requests that meet the SLO and shrinks by a quarter (at most once
per SLO period) when one misses it, as TCP's congestion window does. A request beyond the limit
gets 429 at once, before its body is even read. A request alone is never refused.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class GateClosedError(Exception):
    """Too many requests are waiting for their first token; args: (message, retry_after_s)."""


class FirstTokenGate:
    def __init__(
        self,
        slo_ttft_s: float | None,
        initial: float = 32.0,
        minimum: float = 2.0,
        maximum: float = 4096.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.slo_ttft_s = slo_ttft_s
        self.limit = initial
        self.minimum, self.maximum = minimum, maximum
        self.waiting = 0  # requests (choices) admitted here that have no first token yet
        self._clock = clock
        self._last_cut = float("-inf")

    def check(self, num_requests: int = 1) -> None:
        """Raise GateClosedError if `num_requests` more would exceed the limit."""
        if self.slo_ttft_s is None or self.waiting == 0:
            return
        if self.waiting + num_requests > self.limit:
            raise GateClosedError(
                f"{self.waiting} requests are waiting for their first token (limit "
                f"{self.limit:.0f})",
                max(1.0, self.slo_ttft_s),
            )

    def enter(self, num_requests: int) -> None:
        self.check(num_requests)
        self.waiting += num_requests

    def leave(self, num_requests: int, ttft_s: float | None) -> None:
        """The requests got their first token after `ttft_s` (None: they failed first)."""
        self.waiting = max(0, self.waiting - num_requests)
        if self.slo_ttft_s is None or ttft_s is None:
            return
        if ttft_s <= self.slo_ttft_s:
            self.limit = min(self.maximum, self.limit + num_requests / self.limit)
            return
        now = self._clock()
        if now - self._last_cut >= self.slo_ttft_s:  # one cut per SLO period, not per miss
            self._last_cut = now
            self.limit = max(self.minimum, self.limit * 0.75)
