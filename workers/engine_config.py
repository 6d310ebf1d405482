"""The engine's settings: one model for the offline API, `manta serve` and the Serve config.

A pydantic dataclass, so `cluster.config.ClusterConfig` embeds it as is (validated, with these
descriptions, no copy with other defaults) while the engine stays a plain in-process object.
"""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass


@dataclass(config=ConfigDict(extra="forbid"), slots=True)
class EngineConfig:
    model: str = Field(description="Checkpoint directory in Hugging Face format.")
    model_id: str | None = Field(
        None,
        description="Identity of the weights, part of every block hash (workers and router "
        "must agree on it); default: the model directory.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Compute dtype; auto: bfloat16 on CUDA, float32 on CPU."
    )
    device: str = Field(
        "auto", description="auto (the replica's GPU when CUDA is available, else CPU), cpu, cuda."
    )
    attention_backend: Literal["auto", "torch", "triton", "flash_attn"] = Field(
        "auto",
        description="Paged attention kernels; auto: flash_attn if installed, else triton, on "
        "CUDA; torch (with the native CPU kernel) on CPU.",
    )
    enforce_eager: bool = Field(
        False, description="No CUDA graphs: every decode step runs eagerly."
    )
    block_size: int = Field(16, ge=1, description="Tokens per KV block.")
    kv_cache_bytes: int | None = Field(
        None,
        ge=1,
        description="The KV pool, allocated once at start; default: a fraction "
        "(gpu_memory_utilization) of free GPU memory after the weights, 512 MiB on CPU.",
    )
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    num_blocks: int | None = Field(None, ge=1, description="Exact pool size (overrides bytes).")
    max_num_seqs: int = Field(64, ge=1, description="Most sequences in one step.")
    max_num_batched_tokens: int = Field(2048, ge=1, description="Most tokens in one step.")
    max_model_len: int | None = Field(None, ge=1, description="Context cap (default: model's).")
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    batching: Literal["adaptive", "fixed", "learned"] = "adaptive"
    learned_policy: str | None = Field(
        None,
        description="batching=learned: the parameters file (`manta train-scheduler` writes "
        "one); default: the one shipped with Manta.",
    )
    latency_weight: float = Field(
        1.0, ge=0, description="Adaptive batching: running requests' latency vs the queue's."
    )
    enable_kv_sharing: bool = Field(
        False, description="Export hot prompt blocks for other workers and accept theirs."
    )
    speculative: dict | None = Field(
        None,
        description='Speculative decoding, e.g. {"method": "ngram", "num_speculative_tokens": '
        '4} or {"method": "draft", "model": DIR, "num_speculative_tokens": "auto"}.',
    )
    kv_share_after: int = Field(2, ge=1, description="Prompts a block is in before export.")
    kv_store_secret: str | None = Field(
        None,
        repr=False,
        description="Key of the MAC every shared KV payload carries (>= 16 characters); KV "
        "sharing needs it.",
    )
    num_threads: int | None = Field(
        None, ge=1, description="CPU threads for compute (default: torch's setting)."
    )
    seed: int = 0
