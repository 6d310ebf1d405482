"""One small named actor per model: the embedded prefix index of a Ray cluster without Redis,
and, with or without Redis, the workers' stats reports (kvstore/worker_reports.py).

Workers publish to it and the router queries it through `ActorPrefixIndex` (the `PrefixIndex`
interface) and `ActorWorkerReports`. Calls are awaited with a short timeout so an actor that
is slow or gone degrades routing to load-only and /metrics to "no report" instead of stalling.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

import ray

from kvstore.events import KVEvent
from kvstore.index import InMemoryPrefixIndex, PrefixIndex
from kvstore.worker_reports import WorkerReports

logger = logging.getLogger(__name__)
ACTOR_NAMESPACE = "manta"
# Ray gives the head node this resource (and no other node): a sliver of it pins an actor there.
HEAD_NODE_RESOURCE = "node:__internal_head__"


@ray.remote(num_cpus=0)
class PrefixIndexActor:
    def __init__(self, ttl_s: float) -> None:
        self.index = InMemoryPrefixIndex(ttl_s=ttl_s)
        self.reports = WorkerReports()

    async def publish(self, worker_id: str, events: list[KVEvent]) -> None:
        await self.index.publish(worker_id, events)

    async def heartbeat(self, worker_id: str) -> bool:
        return await self.index.heartbeat(worker_id)

    async def report(self, worker_id: str, stats: dict[str, float]) -> None:
        await self.reports.report(worker_id, stats)

    async def worker_stats(self) -> dict[str, dict[str, float]]:
        return await self.reports.worker_stats()

    async def remove_worker(self, worker_id: str) -> None:
        await self.index.remove_worker(worker_id)
        await self.reports.remove_worker(worker_id)

    async def match(self, block_hashes: list[int]) -> dict[str, int]:
        return await self.index.match(block_hashes)

    async def describe(self) -> dict:
        return {**await self.index.describe(), "backend": "ray-actor"}


def actor_name(namespace: str) -> str:
    return f"manta-prefix-index:{namespace}"


class _ActorClient:
    """Calls on the per-model actor, creating it on first use; a failure returns a default."""

    def __init__(self, namespace: str, ttl_s: float, timeout_s: float = 0.5) -> None:
        self._actor = PrefixIndexActor.options(
            name=actor_name(namespace),
            namespace=ACTOR_NAMESPACE,
            get_if_exists=True,
            lifetime="detached",
            # On the head, which outlives worker nodes; and back, empty, if it dies anyway:
            # a worker the index no longer knows republishes its blocks (heartbeat).
            resources={HEAD_NODE_RESOURCE: 0.001},
            max_restarts=-1,
        ).remote(ttl_s)
        self._timeout_s = timeout_s

    async def _call(self, method: str, *args, default=None):
        try:
            ref = getattr(self._actor, method).remote(*args)
            return await asyncio.wait_for(ref, self._timeout_s)
        except Exception as error:  # the index is an accelerator, never a failure
            logger.warning("index actor %s failed: %s", method, error)
            return default


class ActorPrefixIndex(_ActorClient, PrefixIndex):
    """The prefix index in the per-model actor (a cluster without Redis)."""

    async def publish(self, worker_id: str, events: Sequence[KVEvent]) -> None:
        await self._call("publish", worker_id, list(events))

    async def heartbeat(self, worker_id: str) -> bool:
        return await self._call("heartbeat", worker_id, default=True)

    async def remove_worker(self, worker_id: str) -> None:
        await self._call("remove_worker", worker_id)

    async def match(self, block_hashes: Sequence[int]) -> dict[str, int]:
        return await self._call("match", list(block_hashes), default={})

    async def describe(self) -> dict:
        unreachable = {"backend": "ray-actor", "reachable": False, "workers": None, "entries": None}
        return await self._call("describe", default=unreachable)

    async def close(self) -> None:
        return None


class ActorWorkerReports(_ActorClient):
    """The workers' stats reports in the per-model actor: `WorkerReports`' methods."""

    async def report(self, worker_id: str, stats: dict[str, float]) -> None:
        await self._call("report", worker_id, stats)

    async def worker_stats(self) -> dict[str, dict[str, float]]:
        return await self._call("worker_stats", default={})

    async def remove_worker(self, worker_id: str) -> None:
        await self._call("remove_worker", worker_id)


def kill_index_actor(namespace: str) -> None:
    """Remove the detached index actor of a model (on shutdown)."""
    with contextlib.suppress(ValueError):  # no such actor: nothing to remove
        ray.kill(ray.get_actor(actor_name(namespace), namespace=ACTOR_NAMESPACE))
