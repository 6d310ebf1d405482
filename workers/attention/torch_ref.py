"""The reference attention backend in plain PyTorch: correct for any mix of prefill and decode.

Decode sequences (one query token) are attended in one batched call over their gathered
blocks; sequences with several query tokens (prefill, chunked prefill, speculative
verification) are attended one by one with an explicit causal mask offset by their cached
context. This is the CPU path and the oracle the GPU kernels are tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workers.attention.base import AttentionBackend, AttentionMetadata


@dataclass
class _Plan:
    """Per-step work split, computed once and shared by every layer."""

    decode_tokens: torch.Tensor | None  # token indices of single-query sequences
    decode_tables: torch.Tensor | None  # [Bd, num_blocks] their block tables
    decode_mask: torch.Tensor | None  # [Bd, 1, 1, L] which gathered keys are visible
    # (first token index, query length, context length, sequence index, mask or None)
    multi: list[tuple[int, int, int, int, torch.Tensor | None]]


def _visible(q_pos: torch.Tensor, k_len: int, window: int | None) -> torch.Tensor:
    """[len(q_pos), k_len] bool: key j is visible to the query at position p."""
    k_pos = torch.arange(k_len)
    mask = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        mask &= k_pos[None, :] > q_pos[:, None] - window
    return mask


def _make_plan(meta: AttentionMetadata, window: int | None) -> _Plan:
    bs = meta.block_size
    starts = meta.query_start_loc.tolist()
    decode_idx = [i for i, q in enumerate(meta.query_lens_list) if q == 1]
    decode_tokens = decode_tables = decode_mask = None
    if decode_idx:
        lens = meta.seq_lens[decode_idx]
        num_blocks = -(-int(lens.max()) // bs)
        decode_tokens = torch.tensor([starts[i] for i in decode_idx], dtype=torch.int64)
        decode_tables = meta.block_tables[decode_idx, :num_blocks]
        mask = _visible(lens - 1, num_blocks * bs, window)
        mask &= torch.arange(num_blocks * bs)[None, :] < lens[:, None]
        decode_mask = mask[:, None, None, :]
    multi = []
    for i, (q_len, s_len) in enumerate(zip(meta.query_lens_list, meta.seq_lens_list)):
        if q_len == 1:
            continue
        needs_mask = q_len != s_len or (window is not None and window < s_len)
        mask = _visible(torch.arange(s_len - q_len, s_len), s_len, window) if needs_mask else None
        multi.append((starts[i], q_len, s_len, i, mask))
    return _Plan(decode_tokens, decode_tables, decode_mask, multi)


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def forward(self, query, key, value, kv_cache, meta, scale, sliding_window=None):
        plans = meta.plan if isinstance(meta.plan, dict) else {}
        if sliding_window not in plans:
            plans[sliding_window] = _make_plan(meta, sliding_window)
            meta.plan = plans
        plan: _Plan = plans[sliding_window]

        key_cache, value_cache = kv_cache[0], kv_cache[1]
        num_kv_heads, head_dim = key.shape[1], key.shape[2]
        flat_k = key_cache.view(-1, num_kv_heads, head_dim)
        flat_v = value_cache.view(-1, num_kv_heads, head_dim)
        flat_k.index_copy_(0, meta.slot_mapping, key)
        flat_v.index_copy_(0, meta.slot_mapping, value)

        out = torch.empty_like(query)
        if plan.decode_tokens is not None:
            batch = plan.decode_tables.shape[0]
            k = key_cache[plan.decode_tables].view(batch, -1, num_kv_heads, head_dim)
            v = value_cache[plan.decode_tables].view(batch, -1, num_kv_heads, head_dim)
            q = query[plan.decode_tokens].unsqueeze(2)  # [Bd, H, 1, D]
            o = F.scaled_dot_product_attention(
                q,
                k.transpose(1, 2),
                v.transpose(1, 2),
                attn_mask=plan.decode_mask,
                scale=scale,
                enable_gqa=True,
            )
            out[plan.decode_tokens] = o.squeeze(2)
        bs = meta.block_size
        for start, q_len, s_len, seq, mask in plan.multi:
            q = query[start : start + q_len].transpose(0, 1).unsqueeze(0)
            if s_len == q_len:  # no cached context: this step's keys are the whole context
                k, v = key[start : start + q_len], value[start : start + q_len]
            else:
                table = meta.block_tables[seq, : -(-s_len // bs)]
                k = key_cache[table].view(-1, num_kv_heads, head_dim)[:s_len]
                v = value_cache[table].view(-1, num_kv_heads, head_dim)[:s_len]
            o = F.scaled_dot_product_attention(
                q,
                k.transpose(0, 1).unsqueeze(0),
                v.transpose(0, 1).unsqueeze(0),
                attn_mask=mask,
                is_causal=mask is None,
                scale=scale,
                enable_gqa=True,
            )
            out[start : start + q_len] = o.squeeze(0).transpose(0, 1)
        return out.view(query.shape[0], -1)
