"""The flash-attention backend: `flash_attn_varlen_func` over the paged cache, on CUDA.

Two packages provide it. vLLM's build (`vllm_flash_attn`) takes each sequence's key count as
`seqused_k` and pages of any multiple of 16 tokens; upstream `flash_attn` (2.5+) takes
cumulative key counts and pages of a multiple of 256 tokens. New keys and values are written
into their slots first (Triton's store kernel when Triton is there). Per-step int32 metadata is
made once and shared by every layer.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workers.attention.base import AttentionBackend, AttentionMetadata

INSTALL_HINT = "pip install 'manta[gpu]' (vllm-flash-attn) or flash-attn on a CUDA machine"


@dataclass(frozen=True)
class FlashAttnKernel:
    varlen_func: Callable
    uses_seqused_k: bool  # vLLM's build; upstream takes cu_seqlens_k
    block_multiple: int  # page sizes it accepts


def load_flash_attn() -> FlashAttnKernel | None:
    """The first importable flash-attention build, or None."""
    for module, seqused, multiple in (
        ("vllm_flash_attn", True, 16),
        ("vllm.vllm_flash_attn", True, 16),
        ("flash_attn", False, 256),
    ):
        try:
            func = importlib.import_module(module).flash_attn_varlen_func
        except (ImportError, AttributeError):
            continue
        return FlashAttnKernel(func, seqused, multiple)
    return None


@dataclass
class _Plan:
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    seqused_k: torch.Tensor
    block_table: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int


class FlashAttnBackend(AttentionBackend):
    name = "flash_attn"
    supports_cuda_graphs = True

    def __init__(self, kernel: FlashAttnKernel, block_size: int) -> None:
        if block_size % kernel.block_multiple:
            raise ValueError(
                f"flash-attention ({kernel.varlen_func.__module__}) needs KV blocks of a "
                f"multiple of {kernel.block_multiple} tokens, got block_size={block_size}: "
                f"set block_size to {kernel.block_multiple} or use attention_backend='triton'"
            )
        self.kernel = kernel
        try:
            from workers.attention.triton_kernels import store_kv
        except ImportError:
            store_kv = None
        self._store_kv = store_kv

    def _plan(self, meta: AttentionMetadata) -> _Plan:
        device = meta.slot_mapping.device
        seq_lens = meta.device_seq_lens.to(torch.int32)
        return _Plan(
            cu_seqlens_q=meta.device_query_start_loc.to(torch.int32),
            cu_seqlens_k=F.pad(torch.cumsum(seq_lens, 0, dtype=torch.int32), (1, 0)).to(device),
            seqused_k=seq_lens,
            block_table=meta.block_tables.to(torch.int32),
            max_seqlen_q=max(meta.query_lens_list),
            max_seqlen_k=max(meta.seq_lens_list),
        )

    def forward(self, query, key, value, kv_cache, meta, scale, sliding_window=None):
        key_cache, value_cache = kv_cache[0], kv_cache[1]
        if self._store_kv is not None:
            self._store_kv(key, value, key_cache, value_cache, meta.slot_mapping)
        else:
            num_kv_heads, head_dim = key.shape[1], key.shape[2]
            key_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, key)
            value_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, value)
        plan = meta.plan
        if not isinstance(plan, _Plan):
            plan = meta.plan = self._plan(meta)
        window = (-1, -1) if sliding_window is None else (sliding_window - 1, 0)
        keys = (
            {"seqused_k": plan.seqused_k}
            if self.kernel.uses_seqused_k
            else {"cu_seqlens_k": plan.cu_seqlens_k}
        )
        out = self.kernel.varlen_func(
            q=query,
            k=key_cache,
            v=value_cache,
            cu_seqlens_q=plan.cu_seqlens_q,
            max_seqlen_q=plan.max_seqlen_q,
            max_seqlen_k=plan.max_seqlen_k,
            softmax_scale=scale,
            causal=True,
            window_size=window,
            block_table=plan.block_table,
            **keys,
        )
        return out.reshape(query.shape[0], -1)
