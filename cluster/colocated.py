"""A one-worker cluster as one Serve replica: the HTTP ingress and the engine in one process.

With a single worker there is nothing to route between, and the hop from ingress to worker
(a Ray streaming call carrying every delta, serialized on both sides) only costs CPU that the
engine needs: on a 2-core machine it cut the served goodput to a third of what the same router
and engine give in one process (benchmarks/compare.py). So `build_app` puts the router's
frontend and a `Worker` together here when `num_workers` is 1; the worker still publishes its
KV events to the index (in this process, or Redis when the cluster has one) and still
shares hot prompt blocks through Redis. Serve restarts the replica if its engine stops.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from ray import serve

from kvstore.index import make_index
from kvstore.messages import GenerateRequest, RequestDelta
from kvstore.worker_reports import WorkerReports
from router.frontend import Frontend
from router.ingress import serve_app
from workers.deployment import Worker, replica_name
from workers.engine import EngineConfig


class LocalBackend:
    """The frontend's backend over a worker in this very process."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def stream(self, request: GenerateRequest) -> AsyncIterator[RequestDelta]:
        return self.worker.generate(request)


class ColocatedServer:
    """Wrapped by `serve.ingress(None)` and `serve.deployment` in cluster/app.py."""

    async def __init__(
        self,
        engine_config: EngineConfig,
        tokenizer_factory: Callable[[], Any],
        frontend: dict[str, Any],
        http: dict[str, Any],
        *,
        redis_url: str | None,
        index_ttl_s: float,
        **options,  # Worker's publish_interval_s, max_in_flight, stream_interval_s, slo_*_s
    ) -> None:
        model_id = frontend["model_id"]
        index = make_index(redis_url, model_id, index_ttl_s)  # in-process without Redis
        reports = WorkerReports()  # the one worker reports to the frontend beside it
        context = serve.get_replica_context()
        self.worker = Worker(
            engine_config, context.replica_id.unique_id, index, reports, model_id, redis_url,
            worker_name=replica_name(context), **options,
        )  # fmt: skip
        self._frontend = Frontend(
            tokenizer_factory(), LocalBackend(self.worker), index, reports=reports, **frontend
        )
        self._http = http

    def __serve_build_asgi_app__(self):
        return serve_app(self._frontend, self._http, self._liveness)

    async def _liveness(self) -> str | None:
        return None if self.worker.engine.alive else "The engine has stopped."

    def check_health(self) -> None:
        self.worker.check_health()

    async def __del__(self) -> None:
        await self.worker.close()
