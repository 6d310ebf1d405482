"""Tracing's own parts: settings from flags or the OTEL_* variables, and spans that reach a
collector on 127.0.0.1 over both OTLP protocols (http/protobuf, and gRPC to a real gRPC
server), with a W3C context carried across as a worker receives it."""

from __future__ import annotations

import time
from concurrent import futures

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.trace import set_span_in_context

from benchmarks.otlp_collector import Collector, CollectorProcess
from kvstore.telemetry import carrier, extract, make_tracer, settings_from_env


def test_settings_come_from_flags_then_the_environment(monkeypatch):
    for name in ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT",
                 "OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_TRACES_SAMPLER_ARG"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    assert settings_from_env() is None  # off by default
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.25")
    assert settings_from_env() == {
        "endpoint": "http://collector:4317",
        "protocol": "grpc",
        "sample_ratio": 0.25,
    }
    flagged = settings_from_env("http://other:4318", "http/protobuf", 1.0)
    assert flagged == {"endpoint": "http://other:4318", "protocol": "http/protobuf",
                       "sample_ratio": 1.0}  # fmt: skip
    with pytest.raises(ValueError, match="protocol"):
        settings_from_env("http://x:1", "thrift")
    with pytest.raises(ValueError, match="ratio"):
        settings_from_env("http://x:1", None, 1.5)


def test_http_export_and_a_context_carried_across():
    collector = Collector()
    try:
        settings = {"endpoint": collector.url, "protocol": "http/protobuf", "sample_ratio": 1.0}
        router = make_tracer(settings, "router-side", export_delay_s=0.05)
        worker = make_tracer(settings, "worker-side", export_delay_s=0.05)
        parent = router.start_span("generate")
        headers = carrier(set_span_in_context(parent))  # what rides on the request
        child = worker.start_span("worker request", context=extract(headers))
        child.end()
        parent.end()
        deadline = time.time() + 10
        while len(collector.spans) < 2 and time.time() < deadline:
            time.sleep(0.05)
        spans = {s.name: s for s in collector.spans}
        assert spans["worker request"].parent_span_id == spans["generate"].span_id
        assert spans["worker request"].trace_id == spans["generate"].trace_id
        assert {s.service for s in spans.values()} == {"router-side", "worker-side"}
    finally:
        collector.stop()


def test_a_collector_in_its_own_process_counts_what_it_received():
    """The tracing benchmark's collector runs apart from the load's process."""
    collector = CollectorProcess()
    try:
        settings = {"endpoint": collector.url}
        tracer = make_tracer(settings, "router-side", export_delay_s=0.05)
        worker = make_tracer(settings, "worker-side", export_delay_s=0.05)
        for crossing in (True, False):
            root = tracer.start_span("POST /v1/completions")
            side = worker if crossing else tracer
            side.start_span("generate", context=set_span_in_context(root)).end()
            root.end()
        tracer.start_span("orphan").end()
        deadline = time.time() + 10
        while collector.summary()["spans"] < 5 and time.time() < deadline:
            time.sleep(0.05)
        assert collector.summary() == {
            "spans": 5, "traces": 3, "request_traces": 2, "two_service_traces": 1}  # fmt: skip
    finally:
        collector.stop()
    assert collector.process.returncode is not None


def test_unsampled_requests_export_nothing():
    collector = Collector()
    try:
        tracer = make_tracer({"endpoint": collector.url, "sample_ratio": 0.0}, "s", 0.05)
        tracer.start_span("dropped").end()
        time.sleep(0.5)
        assert collector.spans == []
    finally:
        collector.stop()


class GrpcCollector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.names: list[str] = []

    def Export(self, request, context):  # noqa: N802 (the gRPC service's method)
        for resource in request.resource_spans:
            for scope in resource.scope_spans:
                self.names += [span.name for span in scope.spans]
        return trace_service_pb2.ExportTraceServiceResponse()


def test_grpc_export_reaches_a_grpc_collector():
    servicer = GrpcCollector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        settings = {"endpoint": f"http://127.0.0.1:{port}", "protocol": "grpc"}
        tracer = make_tracer(settings, "grpc-side", export_delay_s=0.05)
        tracer.start_span("over grpc").end()
        deadline = time.time() + 10
        while not servicer.names and time.time() < deadline:
            time.sleep(0.05)
        assert servicer.names == ["over grpc"]
    finally:
        server.stop(None)
