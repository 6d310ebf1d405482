"""The Triton attention backend: one kernel launch per layer for any mix of prefill and decode.

Each step's plan (which sequence and which of its query tokens each program takes, and whether
to split long contexts across programs) is made once on the host from the metadata's lists and
shared by every layer. Kernels are in triton_kernels.py; on CPU tensors they need
TRITON_INTERPRET=1 (tests), on CUDA tensors they compile.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from workers.attention import triton_kernels
from workers.attention.base import AttentionBackend, AttentionMetadata

# Split a tile's keys (flash-decoding) when there are fewer programs than this per split and
# every split still gets at least SPLIT_MIN_KEYS keys; MAX_SPLITS bounds the scratch memory.
SPLIT_TARGET_PROGRAMS = 264  # about two waves of an H100/H200's 132 SMs
SPLIT_MIN_KEYS = 512
MAX_SPLITS = 16


@dataclass
class TritonPlan:
    tile_seq: torch.Tensor  # [tiles] on the device
    tile_first: torch.Tensor  # [tiles]
    block_q: int
    num_splits: int
    partials: tuple[torch.Tensor, torch.Tensor] | None


def choose_splits(num_programs: int, max_seq_len: int, target: int = SPLIT_TARGET_PROGRAMS) -> int:
    """How many key ranges each tile's keys are cut into: enough programs for the GPU,
    never a range under SPLIT_MIN_KEYS keys (a power of two, at most MAX_SPLITS)."""
    splits = 1
    while (
        splits < MAX_SPLITS
        and num_programs * splits * 2 <= target
        and max_seq_len // (splits * 2) >= SPLIT_MIN_KEYS
    ):
        splits *= 2
    return splits


def make_tiles(query_lens: list[int], block_q: int) -> tuple[np.ndarray, np.ndarray]:
    """(sequence, first query token) of every tile of `block_q` query tokens."""
    lens = np.asarray(query_lens, dtype=np.int64)
    counts = -(-lens // block_q)
    seqs = np.repeat(np.arange(len(lens), dtype=np.int64), counts)
    starts = np.cumsum(counts) - counts
    firsts = (np.arange(len(seqs), dtype=np.int64) - np.repeat(starts, counts)) * block_q
    return seqs, firsts


class TritonAttentionBackend(AttentionBackend):
    name = "triton"
    supports_cuda_graphs = True

    def __init__(self, num_splits: int | None = None) -> None:
        """`num_splits` fixes the split-K factor (tests); None chooses it per step."""
        self.num_splits = num_splits

    def plan(self, meta: AttentionMetadata, num_heads: int, num_kv_heads: int, head_dim: int):
        device = meta.slot_mapping.device
        block_q = triton_kernels.tile_queries(num_heads // num_kv_heads, max(meta.query_lens_list))
        seqs, firsts = make_tiles(meta.query_lens_list, block_q)
        splits = self.num_splits or choose_splits(len(seqs) * num_kv_heads, max(meta.seq_lens_list))
        partials = None
        if splits > 1:
            tokens = len(meta.slot_mapping)
            partials = (
                torch.empty(splits, tokens, num_heads * head_dim, device=device),
                torch.empty(splits, tokens, num_heads * 2, device=device),
            )
        return TritonPlan(
            torch.from_numpy(seqs).to(device),
            torch.from_numpy(firsts).to(device),
            block_q,
            splits,
            partials,
        )

    def prepare_graph(self, meta: AttentionMetadata) -> None:
        """The plan the warm-up makes (one tile per sequence, splits for the longest context)
        holds for every decode replay: keep it."""

    def forward(self, query, key, value, kv_cache, meta, scale, sliding_window=None):
        key_cache, value_cache = kv_cache[0], kv_cache[1]
        triton_kernels.store_kv(key, value, key_cache, value_cache, meta.slot_mapping)
        plan = meta.plan
        if not isinstance(plan, TritonPlan):
            plan = meta.plan = self.plan(meta, query.shape[1], key.shape[1], query.shape[2])
        out = torch.empty_like(query)
        triton_kernels.paged_attention(
            query,
            key_cache,
            value_cache,
            out,
            meta.block_tables,
            meta.device_seq_lens,
            meta.device_query_start_loc,
            plan.tile_seq,
            plan.tile_first,
            plan.block_q,
            scale,
            sliding_window,
            plan.num_splits,
            plan.partials,
        )
        return out.view(query.shape[0], -1)
