"""A local OTLP/HTTP trace collector (for the tracing benchmark and tests): it accepts
`POST /v1/traces` (protobuf) on 127.0.0.1 and keeps every span it is sent, with its service's
name; `GET /summary` counts them.

    python -m benchmarks.otlp_collector   # prints its URL, serves until killed

In a process of its own, as a real collector is, its work does not fall on the GIL of the
process that sends the load. It parses each body as it comes (in C) and turns it into spans
only when asked, so that while a benchmark runs it takes almost no CPU from the server it measures
(a real collector runs on a machine of its own)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)


@dataclass(frozen=True, slots=True)
class ReceivedSpan:
    service: str
    name: str
    trace_id: str  # 32 hex digits
    span_id: str
    parent_span_id: str  # "" for a root
    attributes: dict


class Collector:
    def __init__(self) -> None:
        self._spans: list[ReceivedSpan] = []
        self._exports: list[ExportTraceServiceRequest] = []  # received, not yet read
        self._lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the http.server API)
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                export = ExportTraceServiceRequest.FromString(body)  # a bad body fails here
                with collector._lock:
                    collector._exports.append(export)
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def do_GET(self) -> None:  # noqa: N802
                reply = json.dumps(collector.summary()).encode()
                self.send_response(200 if self.path == "/summary" else 404)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args) -> None:  # quiet
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def spans(self) -> list[ReceivedSpan]:
        """Every span received so far."""
        with self._lock:
            exports, self._exports = self._exports, []
            for export in exports:
                self._spans.extend(_decode(export))
            return list(self._spans)

    def traces(self) -> dict[str, list[ReceivedSpan]]:
        out: dict[str, list[ReceivedSpan]] = {}
        for span in self.spans:
            out.setdefault(span.trace_id, []).append(span)
        return out

    def summary(self) -> dict[str, int]:
        """Spans received, traces, traces holding a request's root (`POST ...`) span, and of
        those with spans from more than one service (the router's and a worker's)."""
        traces = self.traces()
        rooted = [s for s in traces.values() if any(x.name.startswith("POST") for x in s)]
        crossed = sum(len({x.service for x in spans}) > 1 for spans in rooted)
        return {"spans": sum(map(len, traces.values())), "traces": len(traces),
                "request_traces": len(rooted), "two_service_traces": crossed}  # fmt: skip

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class CollectorProcess:
    """A `Collector` in a child process: `url`, `summary()`, `stop()`."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.otlp_collector"], stdout=subprocess.PIPE, text=True
        )
        self.url = self.process.stdout.readline().strip()
        if not self.url.startswith("http://"):
            self.stop()
            raise RuntimeError("the OTLP collector process did not start")

    def summary(self) -> dict[str, int]:
        import httpx

        return httpx.get(self.url + "/summary", timeout=10, trust_env=False).json()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def _decode(export: ExportTraceServiceRequest) -> list[ReceivedSpan]:
    found = []
    for resource_spans in export.resource_spans:
        service = next(
            (a.value.string_value for a in resource_spans.resource.attributes
             if a.key == "service.name"), "",
        )  # fmt: skip
        for scope in resource_spans.scope_spans:
            for span in scope.spans:
                attributes = {a.key: _value(a.value) for a in span.attributes}
                found.append(ReceivedSpan(
                    service, span.name, span.trace_id.hex(), span.span_id.hex(),
                    span.parent_span_id.hex(), attributes,
                ))  # fmt: skip
    return found


def _value(value):
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


if __name__ == "__main__":
    print(Collector().url, flush=True)
    threading.Event().wait()  # serve until terminated
