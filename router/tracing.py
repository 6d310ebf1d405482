"""The router's spans of one HTTP request: the request itself (a server span, continuing the
client's `traceparent` when it sent one), its tokenizing, and one `generate` span per engine
request (prompt x n) whose context travels with the request to its worker, so the worker's
queue / prefill / decode spans hang below it in the same trace."""

from __future__ import annotations

import contextlib
import json
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping

from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer, set_span_in_context

from kvstore.messages import GenerateRequest, RequestDelta
from kvstore.telemetry import carrier, extract

# The routing decisions of traced requests, by request id. Serve's request router runs in the
# ingress process but outside the request's context, so it leaves its candidates' scores here
# and the request's `generate` span takes them. Bounded: a request may end before it reads them.
_DECISIONS: OrderedDict[str, tuple[str, dict[str, float]]] = OrderedDict()
MAX_DECISIONS = 1024


def note_routing(request: GenerateRequest, kind: str, scores: Mapping[str, float]) -> None:
    """What the router scored each candidate worker for a traced request (`kind`: what the
    numbers are, e.g. the prefix score or the predicted seconds to first token)."""
    if request.trace_context is None:
        return
    _DECISIONS[request.request_id] = (kind, {w: round(float(s), 6) for w, s in scores.items()})
    _DECISIONS.move_to_end(request.request_id)
    while len(_DECISIONS) > MAX_DECISIONS:
        _DECISIONS.popitem(last=False)


def take_routing(request_id: str) -> tuple[str, dict[str, float]] | None:
    return _DECISIONS.pop(request_id, None)


class RequestTrace:
    def __init__(self, tracer: Tracer, route: str, headers) -> None:
        self.tracer = tracer
        self.span = tracer.start_span(
            f"POST {route}", context=extract(headers), kind=SpanKind.SERVER,
            attributes={"http.request.method": "POST", "http.route": route},
        )  # fmt: skip
        self._context = set_span_in_context(self.span)
        self._ended = False

    @contextlib.contextmanager
    def step(self, name: str):
        with self.tracer.start_as_current_span(name, context=self._context) as span:
            yield span

    def generate(self, request: GenerateRequest, policy: str) -> Span:
        """The span of one engine request, started now; its context rides on `request`."""
        span = self.tracer.start_span("generate", context=self._context, kind=SpanKind.CLIENT)
        hint = request.routing
        span.set_attribute("manta.prompt_tokens", len(request.prompt_token_ids))
        span.set_attribute("manta.routing.policy", policy)
        if hint is not None:  # what the prefix index said each worker holds
            span.set_attribute("manta.routing.matched_blocks", json.dumps(hint.matched_blocks))
        request.trace_context = carrier(set_span_in_context(span))
        return span

    def end(self, status: int, error: str | None = None) -> None:
        if self._ended:
            return
        self._ended = True
        self.span.set_attribute("http.response.status_code", status)
        if error is not None or status >= 500:
            self.span.set_status(Status(StatusCode.ERROR, error))
        self.span.end()


async def traced(
    stream: AsyncIterator[RequestDelta], span: Span, request_id: str
) -> AsyncIterator[RequestDelta]:
    """Pass the deltas through, recording on `span` the routing decision, where the request ran
    and how it ended."""
    output = 0
    try:
        async for delta in stream:
            if not output:  # the first deltas: the router has chosen by now
                decision = take_routing(request_id)
                if decision is not None:
                    span.set_attribute("manta.routing.score_kind", decision[0])
                    span.set_attribute("manta.routing.candidates", json.dumps(decision[1]))
            output = delta.num_output_tokens or output
            if delta.finished:
                span.set_attribute("manta.worker", delta.worker_id)
                span.set_attribute("manta.finish_reason", delta.finish_reason or "stop")
                span.set_attribute("manta.cached_tokens", delta.num_cached_tokens)
            yield delta
    except BaseException as error:
        span.set_status(Status(StatusCode.ERROR, type(error).__name__))
        raise
    finally:
        take_routing(request_id)  # a request that never streamed leaves nothing behind
        span.set_attribute("manta.output_tokens", output)
        span.end()
