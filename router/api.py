"""The OpenAI-compatible HTTP API: routes, server-sent event streams and error bodies.

Routes read their per-replica state (`frontend`, `metrics`, `retry_after_s`) from `app.state`,
which the ingress fills in, so one module-level-free app factory serves Ray Serve and tests.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from kvstore.messages import (
    RequestDelta,
    RequestRejectedError,
    WorkerOverloadedError,
    WorkerUnavailableError,
)
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
from router.responses import ChatFormatter, CompletionFormatter

logger = logging.getLogger(__name__)


class HTTPError(Exception):
    def __init__(self, status: int, message: str, type: str, param=None, code=None) -> None:
        super().__init__(message)
        self.status, self.type, self.param, self.code = status, type, param, code


def _as_http_error(error: BaseException) -> HTTPError:
    if isinstance(error, HTTPError):
        return error
    if isinstance(error, ContextLengthError):
        return HTTPError(
            400, str(error), "invalid_request_error", "messages", "context_length_exceeded"
        )
    if isinstance(error, (RequestRejectedError, ValueError)):
        return HTTPError(400, str(error), "invalid_request_error")
    if isinstance(error, WorkerOverloadedError):
        return HTTPError(
            429, "The server is overloaded; retry later.", "rate_limit_error", None, "overloaded"
        )
    if isinstance(error, WorkerUnavailableError):
        return HTTPError(503, "No healthy worker is available.", "service_unavailable")
    logger.error("request failed", exc_info=error)
    return HTTPError(500, f"internal error: {type(error).__name__}", "internal_error")


def _error_response(request: Request, error: HTTPError) -> JSONResponse:
    headers = {}
    if error.status == 429:
        headers["Retry-After"] = str(request.app.state.retry_after_s)
    request.app.state.metrics.requests.labels(str(error.status)).inc()
    return JSONResponse(
        error_body(str(error), error.type, error.param, error.code), error.status, headers=headers
    )


async def _parse(request: Request, model_cls):
    try:
        raw = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HTTPError(
            400, f"We could not parse the JSON body of your request: {e}", "invalid_request_error"
        ) from None
    if not isinstance(raw, dict):
        raise HTTPError(400, "The request body must be a JSON object.", "invalid_request_error")
    try:
        body = model_cls.model_validate(raw)
    except ValidationError as e:
        err = validation_error_body(e.errors())["error"]
        raise HTTPError(400, err["message"], err["type"], err["param"]) from None
    frontend: Frontend = request.app.state.frontend
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
    """Observe time to first token and inter-token latency as the deltas pass."""
    last = None
    async for delta in stream:
        now = time.perf_counter()
        if delta.new_token_ids:
            if last is None:
                metrics.ttft.observe(now - start)
            else:
                metrics.itl.observe((now - last) / len(delta.new_token_ids))
            last = now
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


async def _prepare(request: Request, body, prompts: list[list[int]]):
    """One GenerateRequest per choice (prompt x n), each with its own seed when seeded."""
    frontend: Frontend = request.app.state.frontend
    sampling = body.to_sampling_kwargs()
    n = sampling.pop("n")
    subs = []
    for ids in prompts:
        for j in range(n):
            seed = sampling["seed"]
            child = {**sampling, "seed": None if seed is None else seed + j}
            subs.append(await frontend.build_request(ids, child, body.priority))
    start = time.perf_counter()
    metrics = request.app.state.metrics
    streams = [_timed(frontend.stream(sub), metrics, start) for sub in subs]
    return subs, streams


async def _respond(request: Request, body, formatter, prompts: list[list[int]]) -> Response:
    subs, streams = await _prepare(request, body, prompts)
    metrics = request.app.state.metrics
    if not body.stream:
        async for index, delta in _merged(streams):
            formatter.add(index, delta)
        metrics.requests.labels("200").inc()
        return JSONResponse(formatter.response())

    merged = _merged(streams)
    try:  # errors before the first token still get a proper HTTP status
        first = await anext(merged)
    except StopAsyncIteration:
        first = None

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
            metrics.requests.labels("200").inc()
        except Exception as error:
            http = _as_http_error(error)
            yield f"data: {json.dumps(error_body(str(http), http.type, http.param, http.code))}\n\n"
        finally:
            await merged.aclose()
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


def create_app() -> FastAPI:
    app = FastAPI(title="Manta", docs_url=None, redoc_url=None)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        try:
            body = await _parse(request, CompletionRequest)
            frontend: Frontend = request.app.state.frontend
            prompts = [frontend.encode(p) for p in body.prompts()]
            formatter = CompletionFormatter(body, frontend, prompts)
            return await _respond(request, body, formatter, prompts)
        except Exception as error:
            return _error_response(request, _as_http_error(error))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        try:
            body = await _parse(request, ChatCompletionRequest)
            frontend: Frontend = request.app.state.frontend
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            prompt = frontend.render_chat(messages, add_generation_prompt=True)
            formatter = ChatFormatter(body, frontend, [prompt])
            return await _respond(request, body, formatter, [prompt])
        except Exception as error:
            return _error_response(request, _as_http_error(error))

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        name = request.app.state.frontend.model_name
        return JSONResponse(ModelList(data=[ModelCard(id=name)]).model_dump())

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        state = request.app.state
        state.metrics.set_worker_stats(await state.frontend.worker_stats())
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    return app
