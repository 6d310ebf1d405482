"""OpenTelemetry tracing, shared by the router and the workers (each process makes its own
tracer): OTLP export over http/protobuf or gRPC, parent-based ratio sampling, and the W3C
trace context that a request carries from the router into its worker.

Off unless an endpoint is given (or `OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT` is set where the
settings are made): then no tracer exists and the serving path only tests for None. No global
provider is installed; the tracer is an object passed to the code that traces.
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit

from opentelemetry.propagators.textmap import DefaultGetter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

PROTOCOLS = ("http/protobuf", "grpc")
PROPAGATOR = TraceContextTextMapPropagator()


def settings_from_env(
    endpoint: str | None = None, protocol: str | None = None, sample_ratio: float | None = None
) -> dict | None:
    """Tracing settings from flags, falling back on the standard `OTEL_*` variables; None
    when no endpoint is known (tracing off)."""
    env = os.environ
    endpoint = (
        endpoint
        or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )
    if not endpoint:
        return None
    protocol = (
        protocol
        or env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    )
    if protocol not in PROTOCOLS:
        raise ValueError(f"OTLP protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if sample_ratio is None:
        sample_ratio = float(env.get("OTEL_TRACES_SAMPLER_ARG", 1.0))
    if not 0.0 <= sample_ratio <= 1.0:
        raise ValueError(f"the trace sample ratio must be within [0, 1], got {sample_ratio}")
    return {"endpoint": endpoint, "protocol": protocol, "sample_ratio": sample_ratio}


def make_tracer(settings: dict | None, service: str, export_delay_s: float = 1.0) -> Tracer | None:
    """A tracer exporting to `settings["endpoint"]`, or None when tracing is off."""
    if not settings:
        return None
    endpoint, protocol = settings["endpoint"], settings.get("protocol", "http/protobuf")
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=endpoint, insecure=endpoint.startswith("http://"))
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        if urlsplit(endpoint).path in ("", "/"):  # a collector's base URL, as vLLM takes it
            endpoint = endpoint.rstrip("/") + "/v1/traces"
        exporter = OTLPSpanExporter(endpoint=endpoint)
    sampler = ParentBased(TraceIdRatioBased(settings.get("sample_ratio", 1.0)))
    provider = TracerProvider(sampler=sampler, resource=Resource.create({"service.name": service}))
    delay_ms = max(1, round(export_delay_s * 1e3))
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=delay_ms))
    return provider.get_tracer("manta")


def extract(headers) -> object:
    """The trace context a client sent (`traceparent`, `tracestate`), or an empty one."""
    return PROPAGATOR.extract(headers, getter=DefaultGetter())


def carrier(context) -> dict[str, str]:
    """The context as W3C headers, to travel with a request into its worker."""
    out: dict[str, str] = {}
    PROPAGATOR.inject(out, context=context)
    return out
