"""Every setting of a Manta cluster, in one pydantic model: the single source of truth.

`manta serve` flags, `deploy/serve.yaml` and tests all build a `ClusterConfig`; each component
then receives only the few numbers it needs (`engine_config()`, `router_settings()`, ...).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from router.auth import parse_api_keys
from workers.engine_config import EngineConfig


class RouterSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    policy: Literal["prefix", "predicted_latency", "round_robin", "least_loaded"] = Field(
        "prefix",
        description="prefix: cached overlap against load; predicted_latency: the lowest "
        "predicted time to first token (an online regression); the others for comparison.",
    )
    hit_weight: float = Field(
        1.0, ge=0, description="Score per cached prompt token a worker already holds."
    )
    # Tuned on benchmarks/routing.py (16 tenants, 4 workers, pools holding ~5 prompts each):
    # a heavier load or KV-pressure term copies a tenant's prompt onto a second worker and
    # evicts other tenants there.
    load_weight: float = Field(
        32.0, ge=0, description="Score lost per request running or queued on a worker."
    )
    kv_pressure_weight: float = Field(
        32.0, ge=0, description="Score lost as a worker's KV pool fills (times usage ratio)."
    )
    affinity_bonus: float = Field(
        96.0,
        ge=0,
        description="Score for the consistent-hash home of a cold prefix, so tenants stick.",
    )
    latency_slack_s: float = Field(
        0.05,
        ge=0,
        description="predicted_latency: among workers predicted within this many seconds "
        "of the fastest, the one holding most of the prompt wins.",
    )
    slo_ttft_s: float | None = Field(
        None,
        gt=0,
        description="predicted_latency: the time to first token to keep workers within. A "
        "request no worker is predicted to meet it on, though an idle one would, goes to the "
        "slowest worker rather than push one that still meets it past it. None: the "
        "cluster's slo_ttft_s.",
    )
    affinity_prefix_tokens: int = Field(
        64, ge=1, description="Leading prompt tokens that define a tenant for affinity."
    )


class AutoscalingSettings(BaseModel):
    """Serve's `autoscaling_config` for the worker deployment (its field names and meaning):
    replicas are added while each holds more than `target_ongoing_requests`, removed after
    `downscale_delay_s` below it. `num_workers` is then only where it starts."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(1, ge=1, description="Workers kept however idle the app is.")
    max_replicas: int = Field(1, ge=1, description="Workers the app may grow to.")
    target_ongoing_requests: float = Field(
        8.0, gt=0, description="Requests per worker (running + queued) that autoscaling aims at."
    )
    upscale_delay_s: float = Field(10.0, ge=0, description="Load must stay high this long.")
    downscale_delay_s: float = Field(60.0, ge=0, description="Load must stay low this long.")
    metrics_interval_s: float = Field(
        2.0, gt=0, description="How often replicas report their load to the controller."
    )
    look_back_period_s: float = Field(
        10.0, gt=0, description="The window over which that load is averaged."
    )

    @model_validator(mode="after")
    def _range(self) -> AutoscalingSettings:
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas})"
            )
        return self


class ClusterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(..., description="Checkpoint directory in Hugging Face format.")
    served_model_name: str | None = Field(None, description="Name clients use (default: dir).")
    num_workers: int = Field(1, ge=1, description="Worker replicas, one engine each.")
    num_cpus_per_worker: float = Field(1.0, ge=0)
    num_gpus_per_worker: float = Field(0.0, ge=0, description="1 on GPU clusters.")
    worker_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each worker reserves besides CPUs and GPUs, e.g. "
        '{"accelerator_type:H100": 0.001} or a resource only some nodes declare: which '
        "nodes may hold a worker.",
    )
    ingress_on_head: bool = Field(
        True,
        description="Keep the ingress (router, tokenizer, streams to the clients) on the head "
        "node, beside Serve's controller: a worker node lost then costs none of the requests "
        "that pass through the ingress, which retries them on the workers left.",
    )
    redis_url: str | None = Field(None, description="Prefix index in Redis; None: embedded.")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    max_ongoing_requests: int = Field(
        128, ge=1, description="Requests a worker accepts at once (running + queued)."
    )
    max_queued_requests: int = Field(
        256, ge=-1, description="Requests waiting for a worker at the router before 429."
    )
    retry_after_s: int = Field(1, ge=0, description="Retry-After sent with 429.")
    slo_ttft_s: float | None = Field(
        2.0,
        gt=0,
        description="A worker refuses (429, Retry-After from the predicted drain time) a "
        "request whose predicted time to first token exceeds this; None: never.",
    )
    tool_call_parser: Literal["hermes", "llama3_json", "mistral"] | None = Field(
        None,
        description="How the model writes tool calls (the format `tool_choice: auto` reads); "
        "None: the one its chat template teaches.",
    )
    max_tokens_cap: int | None = Field(
        None,
        ge=1,
        description="The most tokens one choice may generate: the default when a request "
        "sets no max_tokens (else what the context leaves), and a 400 above it.",
    )
    slo_itl_s: float | None = Field(
        None,
        gt=0,
        description="A worker refuses (429) a request that would grow its decode batch past "
        "what keeps each step within this many seconds; None: never.",
    )
    api_keys: list[str] = Field(
        default_factory=list,
        description="`KEY[:TENANT]` entries; with any, /v1 needs `Authorization: Bearer KEY`. "
        "Also read from MANTA_API_KEYS (comma-separated) by `manta serve`.",
    )
    rate_limit_rps: float | None = Field(
        None, gt=0, description="Requests per second per tenant (token bucket); None: no limit."
    )
    rate_limit_burst: int = Field(16, ge=1, description="Requests a tenant may send at once.")
    max_request_body_bytes: int = Field(4 * 2**20, ge=1024, description="Larger bodies get 413.")
    record_trace: str | None = Field(
        None,
        description="Append the served traffic to this JSONL trace (kvstore/trace.py): one "
        "line per engine request with token counts and timings, never text; a path on the "
        "ingress replica's machine (relative: to its working directory). None: no recording.",
    )
    special_tokens_in_content: bool = Field(
        False,
        description="Read special tokens typed in chat messages as control tokens (by default "
        "they are text, so a message cannot forge a turn).",
    )
    index_ttl_s: float = Field(15.0, gt=0, description="A silent worker's index entries expire.")
    publish_interval_s: float = Field(0.2, gt=0, description="How often workers publish events.")
    stream_interval_s: float = Field(
        0.05,
        ge=0,
        description="A stream sends at most one message per interval after its first token "
        "(tokens made meanwhile travel together): less per-token work in every process on "
        "the way; 0 sends every step's tokens at once.",
    )
    colocate_single_worker: bool = Field(
        True,
        description="With one worker, run the ingress and the engine in one replica: no Ray "
        "hop per streamed delta (there is nothing to route between).",
    )
    engine: EngineConfig = Field(
        description="The workers' engine settings (workers.engine_config.EngineConfig); its "
        "`model` is always this config's `model`."
    )
    router: RouterSettings = Field(default_factory=RouterSettings)
    otlp_traces_endpoint: str | None = Field(
        None,
        description="OTLP collector for OpenTelemetry traces of every request (router and "
        "worker spans); None: tracing off. `manta serve` also reads OTEL_EXPORTER_OTLP_*.",
    )
    otlp_traces_protocol: Literal["http/protobuf", "grpc"] = Field(
        "http/protobuf", description="How traces are exported."
    )
    trace_sample_ratio: float = Field(
        1.0, ge=0, le=1, description="Share of requests traced (a client's sampled flag rules)."
    )
    autoscaling: AutoscalingSettings | None = Field(
        None, description="Scale workers with load (Serve autoscaling); None: num_workers fixed."
    )

    @model_validator(mode="before")
    @classmethod
    def _engine_serves_the_model(cls, data: Any) -> Any:
        """The engine settings are given without the model: it is the cluster's."""
        if isinstance(data, dict):
            engine = data.get("engine") or {}
            if isinstance(engine, EngineConfig):
                engine = dataclasses.asdict(engine)
            if "model" in engine and engine["model"] != data.get("model"):
                raise ValueError("set the model once, at the top level, not under engine")
            engine = {**engine, "model": data.get("model")}
            if not engine.get("kv_store_secret") and os.environ.get("MANTA_KV_STORE_SECRET"):
                engine["kv_store_secret"] = os.environ["MANTA_KV_STORE_SECRET"]
            data = {**data, "engine": engine}
        return data

    @field_validator("api_keys")
    @classmethod
    def _keys_parse(cls, value: list[str]) -> list[str]:
        parse_api_keys(value)  # a malformed key fails at start, not at the first request
        return value

    @model_validator(mode="after")
    def _gpu_engines_reserve_gpus(self) -> ClusterConfig:
        """Ray hides the GPUs from an actor that reserves none, so a CUDA engine needs one."""
        if self.engine.device.startswith("cuda") and self.num_gpus_per_worker <= 0:
            raise ValueError(
                f"engine.device {self.engine.device!r} needs num_gpus_per_worker >= 1 (Ray "
                "shows a worker only the GPUs it reserves); or use device 'auto'"
            )
        return self

    def http_settings(self) -> dict[str, Any]:
        """What the ingress's HTTP front needs (router/ingress.py serve_app)."""
        return {
            "retry_after_s": self.retry_after_s,
            "api_keys": list(self.api_keys),
            "rate_limit_rps": self.rate_limit_rps,
            "rate_limit_burst": self.rate_limit_burst,
            "max_request_body_bytes": self.max_request_body_bytes,
            "slo_ttft_s": self.slo_ttft_s,
            "record_trace": self.record_trace,
            "tracing": self.tracing_settings(),
            "routing_policy": self.router.policy,
        }

    def tracing_settings(self) -> dict | None:
        """For kvstore.telemetry.make_tracer in the ingress and worker processes."""
        if not self.otlp_traces_endpoint:
            return None
        return {"endpoint": self.otlp_traces_endpoint, "protocol": self.otlp_traces_protocol,
                "sample_ratio": self.trace_sample_ratio}  # fmt: skip

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model

    def engine_config(self) -> EngineConfig:
        """The workers' engine settings, keyed to the served model name and sized to the
        CPUs each worker is given."""
        threads = max(1, round(self.num_cpus_per_worker)) if self.num_cpus_per_worker else None
        return dataclasses.replace(
            self.engine,
            model_id=self.model_name,
            enable_kv_sharing=self.redis_url is not None and bool(self.engine.kv_store_secret),
            num_threads=self.engine.num_threads or threads,
        )
