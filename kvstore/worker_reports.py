"""The stats each worker last reported (load, cache and counters), read back for /metrics.

Reports travel through Ray (the cluster's named index actor, kvstore/index_actor.py) or stay in
the process, never only through Redis: an outage of Redis must hide no worker from /metrics. A
report older than `fresh_s` is dropped, so a worker that died without saying goodbye leaves
/metrics within that time, while one that stopped cleanly, or whose death a stream saw, leaves
at once (`remove_worker`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

DEFAULT_FRESH_S = 5.0
"""Workers report every publish interval (0.2 s by default); 5 s forgives an event loop that
a busy machine stalls (a replica starting beside it on two cores stalled one for over 3 s)."""


class Reports(Protocol):
    """What workers report to and /metrics reads: `WorkerReports` or its actor's client."""

    async def report(self, worker_id: str, stats: dict[str, float]) -> None: ...

    async def worker_stats(self) -> dict[str, dict[str, float]]: ...

    async def remove_worker(self, worker_id: str) -> None: ...


class WorkerReports:
    """One process's reports, a plain dict; `clock` returns seconds (tests inject a fake)."""

    def __init__(
        self, fresh_s: float = DEFAULT_FRESH_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if fresh_s <= 0:
            raise ValueError(f"fresh_s must be positive, got {fresh_s}")
        self._fresh_s = fresh_s
        self._clock = clock
        self._reports: dict[str, tuple[float, dict[str, float]]] = {}

    async def report(self, worker_id: str, stats: dict[str, float]) -> None:
        self._reports[worker_id] = (self._clock(), dict(stats))

    async def worker_stats(self) -> dict[str, dict[str, float]]:
        """The last report of each worker heard from within `fresh_s`; older ones are dropped."""
        cutoff = self._clock() - self._fresh_s
        for worker in [w for w, (at, _) in self._reports.items() if at <= cutoff]:
            del self._reports[worker]
        return {worker: stats for worker, (_, stats) in self._reports.items()}

    async def remove_worker(self, worker_id: str) -> None:
        self._reports.pop(worker_id, None)
