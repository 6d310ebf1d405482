"""The HTTP ingress as a Ray Serve deployment: the FastAPI app in front of the worker handle."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import ray.exceptions
from ray import serve
from ray.serve import context as serve_context
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from kvstore.index import make_index
from kvstore.index_actor import ActorPrefixIndex, ActorWorkerReports
from kvstore.messages import (
    GenerateRequest,
    RequestDelta,
    WorkerOverloadedError,
    WorkerUnavailableError,
)
from kvstore.telemetry import make_tracer
from router.api import RequestLimits, ServerState, create_app
from router.auth import Authenticator, RateLimiter, parse_api_keys
from router.first_token_gate import FirstTokenGate
from router.frontend import Frontend
from router.recorder import TrafficRecorder


def is_worker_failure(error: BaseException) -> bool:
    """A worker that died or vanished (worth retrying elsewhere before the first token)."""
    return isinstance(error, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError))


class ServeBackend:
    """Streams from the worker deployment through its handle (and its request router)."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle = handle.options(stream=True)

    def _call(self, request: GenerateRequest):
        """Start the call under a fresh internal request id. Serve otherwise gives every call
        made while serving one HTTP request that request's id, and its router then confuses
        concurrent calls (the n > 1 choices of one request): one gets routed twice, one never.
        """

        def remote():
            serve_context._set_request_context(_internal_request_id=uuid.uuid4().hex)
            return self.handle.generate.remote(request)

        return contextvars.copy_context().run(remote)

    async def stream(self, request: GenerateRequest) -> AsyncIterator[RequestDelta]:
        response = self._call(request)
        finished = False
        try:
            async for delta in response:
                yield delta
            finished = True
        except BackPressureError as error:
            finished = True
            raise WorkerOverloadedError(str(error)) from None
        except DeploymentUnavailableError as error:
            finished = True
            raise WorkerUnavailableError(str(error)) from None
        finally:
            if not finished:  # the client left mid-stream: abort the request on its worker
                with contextlib.suppress(Exception):
                    response.cancel()


class WorkerLiveness:
    """Whether any replica of the worker deployment runs, as the Serve controller sees it.
    Probes poll /health and must be answered at once, so a task asks the controller every
    `ttl_s` (off the event loop) and a call returns its latest answer, never awaiting one."""

    def __init__(self, deployment: str, ttl_s: float = 1.0) -> None:
        self.deployment, self.ttl_s = deployment, ttl_s
        self._reason: str | None = None
        self._poller: asyncio.Task | None = None

    async def __call__(self) -> str | None:
        if self._poller is None:  # the first call: keep polling, and answer this one fresh
            self._poller = asyncio.get_running_loop().create_task(self._poll())
            self._reason = await asyncio.to_thread(self._query)
        return self._reason

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.ttl_s)
            self._reason = await asyncio.to_thread(self._query)

    def _query(self) -> str | None:
        try:
            app = serve.status().applications[serve.get_replica_context().app_name]
            running = app.deployments[self.deployment].replica_states.get("RUNNING", 0)
        except Exception:  # the controller could not say: no news is not bad news
            return None
        return None if running else "No worker replica is running."


def serve_app(frontend: Frontend, http: dict[str, Any], liveness=None):
    """The FastAPI app of an ingress replica over its frontend. `http`: retry_after_s,
    api_keys (`KEY[:TENANT]` specs), rate_limit_rps, rate_limit_burst, max_request_body_bytes,
    slo_ttft_s, record_trace (ClusterConfig.http_settings())."""
    path = http.get("record_trace")
    state = ServerState(
        frontend,
        retry_after_s=http.get("retry_after_s", 1),
        auth=Authenticator(parse_api_keys(http.get("api_keys", ()))),
        limiter=RateLimiter(http.get("rate_limit_rps"), http.get("rate_limit_burst", 1)),
        limits=RequestLimits(max_body_bytes=http.get("max_request_body_bytes", 4 * 2**20)),
        liveness=liveness,
        gate=FirstTokenGate(http.get("slo_ttft_s")),
        recorder=TrafficRecorder(path, frontend.block_size) if path else None,
        tracer=make_tracer(http.get("tracing"), "manta-router"),
        routing_policy=http.get("routing_policy", "prefix"),
    )
    return create_app(state)


class Ingress:
    """Wrapped by `serve.ingress(None)` and `serve.deployment` in cluster/app.py; Serve asks
    `__serve_build_asgi_app__` for the app once the replica is constructed. `frontend`: the
    Frontend's keyword settings (model_name, model_id, max_model_len, block_size, ...)."""

    def __init__(
        self,
        worker_handle: DeploymentHandle,
        tokenizer_factory: Callable[[], Any],
        frontend: dict[str, Any],
        http: dict[str, Any],
        *,
        redis_url: str | None,
        index_ttl_s: float,
    ) -> None:
        model_id = frontend["model_id"]
        index = (
            # A lookup on the request's path: a silent Redis may cost it 50 ms, no more.
            make_index(redis_url, model_id, index_ttl_s, socket_timeout_s=0.05)
            if redis_url
            else ActorPrefixIndex(model_id, index_ttl_s)
        )
        self._frontend = Frontend(
            tokenizer_factory(),
            ServeBackend(worker_handle),
            index,
            is_worker_failure=is_worker_failure,
            reports=ActorWorkerReports(model_id, index_ttl_s),
            **frontend,
        )
        self._http = http

    def __serve_build_asgi_app__(self):
        liveness = WorkerLiveness(self._http["worker_deployment"])
        return serve_app(self._frontend, self._http, liveness)
