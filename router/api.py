"""The OpenAI-compatible HTTP API: routes, server-sent event streams and error bodies.

`create_app(frontend, ...)` builds one replica's app; its routes read their state (frontend,
metrics, keys, limits) from `app.state`, so the same factory serves Ray Serve, the one-process
server and tests. Every `/v1` request is checked before any work: header count and size,
the API key (401), the tenant's rate (429), `application/json` bodies only (415) and the body
size (413). JSON is parsed with bounded nesting and no lone surrogates; tokenizing and chat
templates run off the event loop, so `/health` answers while a big prompt is encoded. Error
bodies never carry tracebacks, paths or addresses: unexpected errors are logged under an id
that the response names.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from opentelemetry.trace import Tracer
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvstore.messages import (
    RequestDelta,
    RequestRejectedError,
    WorkerOverloadedError,
    WorkerUnavailableError,
)
from router.auth import AuthenticationError, Authenticator, RateLimitedError, RateLimiter
from router.first_token_gate import FirstTokenGate, GateClosedError
from router.frontend import ContextLengthError, Frontend
from router.metrics import Metrics
from router.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    error_body,
    validation_error_body,
)
from router.recorder import TrafficRecorder
from router.responses import ChatFormatter, CompletionFormatter
from router.status import status
from router.tracing import RequestTrace, traced

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RequestLimits:
    """What one HTTP request may ask of the server before any work is done for it."""

    max_body_bytes: int = 4 * 2**20
    max_headers: int = 64
    max_header_bytes: int = 16 * 2**10
    max_json_depth: int = 32


@dataclass
class ServerState:
    frontend: Frontend
    retry_after_s: int = 1
    auth: Authenticator = field(default_factory=lambda: Authenticator({}))
    limiter: RateLimiter = field(default_factory=lambda: RateLimiter(None, 1))
    limits: RequestLimits = field(default_factory=RequestLimits)
    metrics: Metrics | None = None  # None: Metrics labelled with the frontend's model name
    # Why the server cannot serve now (no live worker), or None: /health and /ready ask it.
    liveness: Callable[[], Awaitable[str | None]] | None = None
    gate: FirstTokenGate = field(default_factory=lambda: FirstTokenGate(None))
    recorder: TrafficRecorder | None = None  # `--record-trace`: the traffic, as a trace
    tracer: Tracer | None = None  # OpenTelemetry spans of each request; None: tracing off
    routing_policy: str = "prefix"  # named on the traced routing spans

    def __post_init__(self) -> None:
        if self.metrics is None:
            self.metrics = Metrics(self.frontend.model_name)


class HTTPError(Exception):
    def __init__(
        self, status: int, message: str, type: str, param=None, code=None, retry_after=None
    ) -> None:
        super().__init__(message)
        self.status, self.type, self.param, self.code = status, type, param, code
        self.retry_after = retry_after


def _reason(error: BaseException) -> str:
    """The message of an error raised in a worker, without the traceback Ray wraps it in."""
    cause = getattr(error, "cause", None)
    error = cause if isinstance(cause, BaseException) else error
    return str(error.args[0]) if error.args else type(error).__name__


def _as_http_error(error: BaseException) -> HTTPError:
    if isinstance(error, HTTPError):
        return error
    if isinstance(error, AuthenticationError):
        return HTTPError(401, str(error), "invalid_request_error", None, "invalid_api_key")
    if isinstance(error, RateLimitedError):
        return HTTPError(
            429, str(error), "rate_limit_error", None, "rate_limit_exceeded", error.retry_after_s
        )
    if isinstance(error, ContextLengthError):
        return HTTPError(
            400, str(error), "invalid_request_error", "messages", "context_length_exceeded"
        )
    if isinstance(error, (RequestRejectedError, ValueError)):
        return HTTPError(400, _reason(error), "invalid_request_error")
    if isinstance(error, GateClosedError):
        return HTTPError(
            429, "The server is overloaded; retry later.", "rate_limit_error", None,
            "overloaded", error.args[1],
        )  # fmt: skip
    if isinstance(error, WorkerOverloadedError):
        cause = getattr(error, "cause", None) or error
        wait = cause.args[1] if len(cause.args) > 1 else None
        return HTTPError(
            429, "The server is overloaded; retry later.", "rate_limit_error", None,
            "overloaded", wait,
        )  # fmt: skip
    if isinstance(error, WorkerUnavailableError):
        return HTTPError(503, "No healthy worker is available.", "service_unavailable")
    incident = uuid.uuid4().hex[:16]
    logger.error("request failed (incident %s)", incident, exc_info=error)
    return HTTPError(500, f"Internal error (incident {incident}).", "internal_error")


def _error_response(request: Request, error: HTTPError) -> JSONResponse:
    state: ServerState = request.app.state.manta
    headers = {}
    if error.status == 429:
        wait = error.retry_after if error.retry_after is not None else state.retry_after_s
        headers["Retry-After"] = str(max(1, round(wait)))
    state.metrics.count_status(error.status)
    trace = getattr(request.state, "trace", None)
    if trace is not None:
        trace.end(error.status, str(error))
    return JSONResponse(
        error_body(str(error), error.type, error.param, error.code), error.status, headers=headers
    )


def _guard(request: Request) -> str | None:
    """Checks every `/v1` request passes before any work; returns its tenant."""
    state: ServerState = request.app.state.manta
    limits = state.limits
    raw = request.headers.raw
    if len(raw) > limits.max_headers or sum(len(k) + len(v) for k, v in raw) > (
        limits.max_header_bytes
    ):
        raise HTTPError(431, "Request headers are too many or too large.", "invalid_request_error")
    tenant = state.auth.tenant(request.headers.get("authorization"))
    state.limiter.admit(tenant)
    if request.method == "POST":
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise HTTPError(
                415, "The request body must be JSON (Content-Type: application/json).",
                "invalid_request_error",
            )  # fmt: skip
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limits.max_body_bytes:
            raise _too_large(limits)
    return tenant


def _too_large(limits: RequestLimits) -> HTTPError:
    return HTTPError(
        413, f"The request body exceeds {limits.max_body_bytes} bytes.", "invalid_request_error"
    )


async def _read_body(request: Request, limits: RequestLimits) -> bytes:
    """The body, refused as soon as it grows past the limit (chunked bodies included)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limits.max_body_bytes:
            raise _too_large(limits)
        chunks.append(chunk)
    return b"".join(chunks)


def _check_json(value, max_depth: int) -> None:
    """Nesting within bounds and no lone surrogates (which no tokenizer can encode)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > max_depth:
            raise ValueError(f"the JSON body is nested deeper than {max_depth} levels")
        if isinstance(item, str):
            _check_text(item)
        elif isinstance(item, dict):
            for key, inner in item.items():
                _check_text(key)
                stack.append((inner, depth + 1))
        elif isinstance(item, list):
            stack.extend((inner, depth + 1) for inner in item)


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the JSON body holds a lone surrogate, which is not valid text") from None


async def _parse(request: Request, model_cls):
    state: ServerState = request.app.state.manta
    body_bytes = await _read_body(request, state.limits)
    try:
        raw = json.loads(body_bytes)
        _check_json(raw, state.limits.max_json_depth)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HTTPError(
            400, f"We could not parse the JSON body of your request: {e}", "invalid_request_error"
        ) from None
    except RecursionError:
        raise HTTPError(
            400, "The JSON body is nested too deeply.", "invalid_request_error"
        ) from None
    if not isinstance(raw, dict):
        raise HTTPError(400, "The request body must be a JSON object.", "invalid_request_error")
    try:
        body = model_cls.model_validate(raw)
    except ValidationError as e:
        err = validation_error_body(e.errors())["error"]
        raise HTTPError(400, err["message"], err["type"], err["param"]) from None
    frontend: Frontend = state.frontend
    if body.model != frontend.model_name:
        raise HTTPError(
            404,
            f"The model `{body.model}` does not exist.",
            "invalid_request_error",
            "model",
            "model_not_found",
        )
    return body


async def _timed(stream: AsyncIterator[RequestDelta], metrics: Metrics, start: float):
    """Observe time to first token, inter-token latency and, at the end, the end-to-end
    time and the worker's phase times, as the deltas pass."""
    last = None
    async for delta in stream:
        now = time.perf_counter()
        if delta.new_token_ids:
            if last is None:
                metrics.ttft.observe(now - start)
            else:
                metrics.itl.observe((now - last) / len(delta.new_token_ids))
            last = now
        if delta.finished:
            metrics.observe_finished(delta, now - start)
        yield delta


async def _merged(
    streams: list[AsyncIterator[RequestDelta]],
) -> AsyncIterator[tuple[int, RequestDelta]]:
    """Interleave several choices' streams as their deltas arrive."""
    if len(streams) == 1:
        async for delta in streams[0]:
            yield 0, delta
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int, stream) -> None:
        try:
            async for delta in stream:
                await queue.put((index, delta))
        except BaseException as error:  # handed to the consumer, which re-raises it
            await queue.put((index, error))
        finally:
            await queue.put((index, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


async def _first_delta(gate: FirstTokenGate, merged, num_requests: int):
    """The first delta of any choice, through the gate: errors before it (a refusal, an
    overloaded worker) still get a proper HTTP status, and its wait teaches the gate."""
    gate.enter(num_requests)
    start, ttft = time.perf_counter(), None
    try:
        first = await anext(merged)
        ttft = time.perf_counter() - start
        return first
    except StopAsyncIteration:
        return None
    except BaseException as error:
        if isinstance(error, WorkerOverloadedError):
            ttft = math.inf  # a worker refused it: shed here next time, before the Ray hop
        await merged.aclose()
        raise
    finally:
        gate.leave(num_requests, ttft)


async def _prepare(
    request: Request,
    body,
    prompts: list[list[int]],
    tenant: str | None,
    sampling: dict,
    arrived: float,
):
    """One GenerateRequest per choice (prompt x n), each with its own seed when seeded, and
    its stream (recorded when the server records its traffic)."""
    state: ServerState = request.app.state.manta
    if state.liveness is not None and (reason := await state.liveness()) is not None:
        raise WorkerUnavailableError(reason)  # 503 now, rather than queue for a worker
    n = sampling.pop("n")
    subs = []
    for ids in prompts:
        for j in range(n):
            seed = sampling["seed"]
            # Child seeds wrap within the range generators take: seed + j never overflows.
            child = {**sampling, "seed": None if seed is None else (seed + j) % 2**64}
            subs.append(await state.frontend.build_request(ids, child, body.priority, tenant))
    start = time.perf_counter()
    streams = [_timed(state.frontend.stream(sub), state.metrics, start) for sub in subs]
    trace: RequestTrace | None = getattr(request.state, "trace", None)
    if trace is not None:
        spans = [trace.generate(sub, state.routing_policy) for sub in subs]
        streams = [traced(s, span, sub.request_id) for s, span, sub in zip(streams, spans, subs)]
    if state.recorder is not None:
        streams = [state.recorder.track(s, sub, arrived, tenant) for s, sub in zip(streams, subs)]
    return subs, streams


def _end_trace(request: Request, status: int) -> None:
    trace = getattr(request.state, "trace", None)
    if trace is not None:
        trace.end(status)


def _start_trace(request: Request, route: str) -> RequestTrace | None:
    tracer = request.app.state.manta.tracer
    if tracer is None:
        return None
    request.state.trace = RequestTrace(tracer, route, request.headers)
    return request.state.trace


async def _respond(
    request: Request, body, formatter, prompts, tenant, sampling: dict, arrived: float
) -> Response:
    """`arrived`: when the request reached the router, on the monotonic clock."""
    state: ServerState = request.app.state.manta
    subs, streams = await _prepare(request, body, prompts, tenant, sampling, arrived)
    metrics = state.metrics
    merged = _merged(streams)
    first = await _first_delta(state.gate, merged, len(subs))
    if not body.stream:
        try:
            if first is not None:
                formatter.add(*first)
            async for index, delta in merged:
                formatter.add(index, delta)
        except BaseException as error:
            client_left = isinstance(error, asyncio.CancelledError)
            metrics.count_finished(["abort" if client_left else "error"] * len(subs))
            raise
        finally:
            await merged.aclose()
        metrics.count_status(200)
        response = formatter.response()
        metrics.count_finished(formatter.finish_reasons())
        _end_trace(request, 200)
        return JSONResponse(response)

    async def events() -> AsyncIterator[str]:
        try:
            if first is not None:
                for chunk in formatter.chunks(*first):
                    yield f"data: {chunk}\n\n"
            async for index, delta in merged:
                for chunk in formatter.chunks(index, delta):
                    yield f"data: {chunk}\n\n"
            if body.include_usage:
                yield f"data: {formatter.usage_chunk()}\n\n"
            metrics.count_status(200)
            metrics.count_finished(formatter.finish_reasons())
        except Exception as error:
            metrics.count_finished(["error"] * len(subs))
            http = _as_http_error(error)
            yield f"data: {json.dumps(error_body(str(http), http.type, http.param, http.code))}\n\n"
        except BaseException:  # the client left: the stream is closed or cancelled
            metrics.count_finished(["abort"] * len(subs))
            raise
        finally:
            await merged.aclose()
            _end_trace(request, 200)
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="Manta", docs_url=None, redoc_url=None)
    app.state.manta = state

    @app.exception_handler(StarletteHTTPException)
    async def routing_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        """Unknown paths (404) and wrong methods (405) get the OpenAI error body too."""
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return JSONResponse(
            error_body(str(error.detail), kind), error.status_code, headers=error.headers
        )

    state.frontend.on_recovery = state.metrics.count_recovery
    state.metrics.first_token_limit.set_function(lambda: state.gate.limit)
    state.metrics.waiting_first_token.set_function(lambda: state.gate.waiting)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        arrived = time.monotonic()
        trace = _start_trace(request, "/v1/completions")
        try:
            tenant = _guard(request)
            state.gate.check()  # shed before even reading the body
            body = await _parse(request, CompletionRequest)
            frontend = state.frontend
            with trace.step("tokenize") if trace else contextlib.nullcontext():
                # Off the event loop: a long prompt must not hold up other requests or /health.
                prompts = await asyncio.to_thread(
                    lambda: [frontend.encode(p) for p in body.prompts()]
                )
            sampling = body.to_sampling_kwargs()
            formatter = CompletionFormatter(body, frontend, prompts, sampling)
            return await _respond(request, body, formatter, prompts, tenant, sampling, arrived)
        except Exception as error:
            return _error_response(request, _as_http_error(error))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        arrived = time.monotonic()
        trace = _start_trace(request, "/v1/chat/completions")
        try:
            tenant = _guard(request)
            state.gate.check()
            body = await _parse(request, ChatCompletionRequest)
            frontend = state.frontend
            messages = [m.for_template() for m in body.messages]
            template_kwargs = {"add_generation_prompt": True}
            if (tools := body.template_tools()) is not None:
                template_kwargs["tools"] = tools
            with trace.step("template and tokenize") if trace else contextlib.nullcontext():
                prompt = await asyncio.to_thread(frontend.render_chat, messages, **template_kwargs)
            sampling = body.to_sampling_kwargs()
            formatter = ChatFormatter(body, frontend, [prompt], sampling)
            if formatter.tool_format == "mistral":  # its marker is a special token
                sampling["skip_special_tokens"] = False
            return await _respond(request, body, formatter, [prompt], tenant, sampling, arrived)
        except Exception as error:
            return _error_response(request, _as_http_error(error))

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        try:
            _guard(request)
        except Exception as error:
            return _error_response(request, _as_http_error(error))
        return JSONResponse(ModelList(data=[ModelCard(id=state.frontend.model_name)]).model_dump())

    async def unavailable() -> JSONResponse | None:
        reason = await state.liveness() if state.liveness is not None else None
        if reason is None:
            return None
        return JSONResponse(error_body(reason, "service_unavailable"), 503)

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        """Live: some worker can take a request (503 with the reason when none can)."""
        return await unavailable() or JSONResponse({"status": "ok"})

    @app.get("/ready")
    async def ready(request: Request) -> JSONResponse:
        """Ready: the model is servable now (what a load balancer's readiness probe asks)."""
        return await unavailable() or JSONResponse(
            {"status": "ready", "model": state.frontend.model_name}
        )

    @app.get("/status")
    async def server_status(request: Request) -> JSONResponse:
        """Workers and the prefix index at a glance (what `manta status` prints)."""
        frontend = state.frontend
        reports, index = await asyncio.gather(frontend.worker_stats(), frontend.index_status())
        return JSONResponse(status(frontend.model_name, reports, index))

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        try:
            state.metrics.set_worker_stats(await state.frontend.worker_stats())
        except Exception:  # a corrupt worker entry in the index must not break /metrics
            logger.exception("reading worker stats for /metrics failed")
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    app.openapi = lambda: _openapi(app)
    return app


def _openapi(app: FastAPI) -> dict:
    """The OpenAPI document with the request bodies the routes parse themselves (they read
    the raw body so that keys, size and content type are checked before any parsing)."""
    if app.openapi_schema is None:
        document = get_openapi(title=app.title, version=app.version, routes=app.routes)
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        bodies = {
            "/v1/completions": CompletionRequest,
            "/v1/chat/completions": ChatCompletionRequest,
        }
        for path, model in bodies.items():
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(schema.pop("$defs", {}))
            schemas[model.__name__] = schema
            ref = {"$ref": f"#/components/schemas/{model.__name__}"}
            document["paths"][path]["post"]["requestBody"] = {
                "required": True, "content": {"application/json": {"schema": ref}},
            }  # fmt: skip
        app.openapi_schema = document
    return app.openapi_schema
