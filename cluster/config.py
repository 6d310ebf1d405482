"""Every setting of a Manta cluster, in one pydantic model: the single source of truth.

`manta serve` flags, `deploy/serve.yaml` and tests all build a `ClusterConfig`; each component
then receives only the few numbers it needs (`engine_config()`, `router_settings()`, ...).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from workers.engine import EngineConfig


class EngineSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Compute dtype; float32 on CPU (bfloat16 is slow there)."
    )
    block_size: int = Field(16, ge=1, description="Tokens per KV block.")
    kv_cache_bytes: int = Field(256 * 2**20, ge=1, description="KV pool size per worker.")
    num_blocks: int | None = Field(None, ge=1, description="Exact pool size (overrides bytes).")
    max_num_seqs: int = Field(64, ge=1, description="Most sequences in one step.")
    max_num_batched_tokens: int = Field(2048, ge=1, description="Most tokens in one step.")
    max_model_len: int | None = Field(None, ge=1, description="Context cap (default: model's).")
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    batching: Literal["adaptive", "fixed"] = "adaptive"
    speculative: dict | None = Field(
        None,
        description='Speculative decoding, e.g. {"method": "ngram", "num_speculative_tokens": '
        '4} or {"method": "draft", "model": DIR, "num_speculative_tokens": "auto"}.',
    )
    seed: int = 0


class RouterSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    policy: Literal["prefix", "round_robin", "least_loaded"] = Field(
        "prefix", description="prefix: cached overlap against load; the others for comparison."
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
    affinity_prefix_tokens: int = Field(
        64, ge=1, description="Leading prompt tokens that define a tenant for affinity."
    )


class ClusterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(..., description="Checkpoint directory in Hugging Face format.")
    served_model_name: str | None = Field(None, description="Name clients use (default: dir).")
    num_workers: int = Field(1, ge=1, description="Worker replicas, one engine each.")
    num_cpus_per_worker: float = Field(1.0, ge=0)
    num_gpus_per_worker: float = Field(0.0, ge=0, description="1 on GPU clusters.")
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
    index_ttl_s: float = Field(15.0, gt=0, description="A silent worker's index entries expire.")
    publish_interval_s: float = Field(0.2, gt=0, description="How often workers publish events.")
    engine: EngineSettings = Field(default_factory=EngineSettings)
    router: RouterSettings = Field(default_factory=RouterSettings)

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model

    def engine_config(self) -> EngineConfig:
        return EngineConfig(model=self.model, **self.engine.model_dump())
