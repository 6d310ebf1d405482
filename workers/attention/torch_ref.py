"""The torch attention backend: correct for any mix of prefill and decode, on any device.

On the CPU in float32 the whole flat batch is attended in one call of the paged kernel
(workers/attention/cpu_kernels.py), which reads K/V from the block pool in place. Elsewhere,
or with `native_kernel=False` (the pure-torch reference that other kernels are tested
against): sequences with few query tokens (decode, speculative verification) are attended in
one batched call over their gathered blocks, queries padded to the longest; sequences with
many (prefill, chunked prefill) one by one with a causal mask offset by their cached context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workers.attention import cpu_kernels
from workers.attention.base import AttentionBackend, AttentionMetadata

# Sequences with at most this many query tokens take the batched path.
BATCHED_QUERY_LIMIT = 16


@dataclass
class _Plan:
    """Per-step work split, computed once and shared by every layer."""

    batch_tokens: torch.Tensor | None  # [Bb, Q] token index of each query slot (0 if padding)
    batch_valid: torch.Tensor | None  # [Bb, Q] which query slots are real
    batch_tables: torch.Tensor | None  # [Bb, num_blocks] their block tables
    batch_mask: torch.Tensor | None  # [Bb, 1, Q, L] which gathered keys each query sees
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
    short = [i for i, q in enumerate(meta.query_lens_list) if q <= BATCHED_QUERY_LIMIT]
    tokens = valid = tables = mask = None
    if short:
        lens = meta.seq_lens[short]
        q_lens = torch.tensor([meta.query_lens_list[i] for i in short])
        slots = torch.arange(int(q_lens.max()))
        valid = slots[None, :] < q_lens[:, None]
        tokens = torch.tensor([starts[i] for i in short])[:, None] + slots[None, :]
        tokens = torch.where(valid, tokens, 0)
        num_blocks = -(-int(lens.max()) // bs)
        tables = meta.block_tables[short, :num_blocks]
        q_pos = (lens - q_lens)[:, None] + slots[None, :]  # [Bb, Q] absolute positions
        k_pos = torch.arange(num_blocks * bs)
        mask = k_pos[None, None, :] <= q_pos[:, :, None]
        if window is not None:
            mask &= k_pos[None, None, :] > q_pos[:, :, None] - window
        # Padding query slots see key 0 only, so softmax stays finite; their output is dropped.
        mask |= ~valid[:, :, None] & (k_pos == 0)[None, None, :]
        mask = mask[:, None]
    multi = []
    for i, (q_len, s_len) in enumerate(zip(meta.query_lens_list, meta.seq_lens_list)):
        if q_len <= BATCHED_QUERY_LIMIT:
            continue
        needs_mask = q_len != s_len or (window is not None and window < s_len)
        seq_mask = (
            _visible(torch.arange(s_len - q_len, s_len), s_len, window) if needs_mask else None
        )
        multi.append((starts[i], q_len, s_len, i, seq_mask))
    return _Plan(tokens, valid, tables, mask, multi)


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def __init__(self, native_kernel: bool = True) -> None:
        self.native_kernel = native_kernel
        # Gather buffers reused across layers and steps: a fresh multi-megabyte tensor per
        # layer would be page-faulted in anew each time, which costs more than the copy.
        self._scratch: dict[str, torch.Tensor] = {}

    def _use_kernel(self, query: torch.Tensor) -> bool:
        """The CPU kernel serves float32 CPU tensors once it is built on this machine."""
        return (
            self.native_kernel
            and query.device.type == "cpu"
            and query.dtype == torch.float32
            and cpu_kernels.available()
        )

    def _gather(self, name: str, cache: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        """The blocks listed in `tables`, copied out in order (index_select over whole
        flattened blocks: several times faster on CPU than advanced indexing)."""
        flat = cache.view(cache.shape[0], -1)
        rows = tables.numel()
        key = f"{name}:{flat.shape[1]}:{cache.dtype}"
        buf = self._scratch.get(key)
        if buf is None or buf.shape[0] < rows:
            buf = torch.empty(max(rows, 64), flat.shape[1], dtype=cache.dtype, device=cache.device)
            self._scratch[key] = buf
        out = buf[:rows]
        torch.index_select(flat, 0, tables.reshape(-1), out=out)
        return out

    def forward(self, query, key, value, kv_cache, meta, scale, sliding_window=None):
        key_cache, value_cache = kv_cache[0], kv_cache[1]
        num_kv_heads, head_dim = key.shape[1], key.shape[2]
        flat_k = key_cache.view(-1, num_kv_heads, head_dim)
        flat_v = value_cache.view(-1, num_kv_heads, head_dim)
        flat_k.index_copy_(0, meta.slot_mapping, key)
        flat_v.index_copy_(0, meta.slot_mapping, value)
        out = torch.empty_like(query)
        if self._use_kernel(query):
            if not isinstance(meta.plan, torch.Tensor):
                # Sequences sharing a prefix (the same first block) side by side: the prefix's
                # blocks are read from memory once and from cache by the rest.
                meta.plan = torch.argsort(meta.block_tables[:, 0], stable=True).contiguous()
            cpu_kernels.paged_attention(
                query,
                key_cache,
                value_cache,
                meta.block_tables,
                meta.query_start_loc,
                meta.seq_lens,
                meta.plan,
                out,
                scale,
                sliding_window,
            )
            return out.view(query.shape[0], -1)

        plans = meta.plan if isinstance(meta.plan, dict) else {}
        if sliding_window not in plans:
            plans[sliding_window] = _make_plan(meta, sliding_window)
            meta.plan = plans
        plan: _Plan = plans[sliding_window]
        if plan.batch_tokens is not None:
            batch = plan.batch_tables.shape[0]
            k = self._gather("k", key_cache, plan.batch_tables)
            v = self._gather("v", value_cache, plan.batch_tables)
            k = k.view(batch, -1, num_kv_heads, head_dim)
            v = v.view(batch, -1, num_kv_heads, head_dim)
            q = query[plan.batch_tokens].transpose(1, 2)  # [Bb, H, Q, D]
            o = F.scaled_dot_product_attention(
                q,
                k.transpose(1, 2),
                v.transpose(1, 2),
                attn_mask=plan.batch_mask,
                scale=scale,
                enable_gqa=True,
            )
            o = o.transpose(1, 2)  # [Bb, Q, H, D]
            out[plan.batch_tokens[plan.batch_valid]] = o[plan.batch_valid]
        bs = meta.block_size
        for start, q_len, s_len, seq, mask in plan.multi:
            q = query[start : start + q_len].transpose(0, 1).unsqueeze(0)
            if s_len == q_len:  # no cached context: this step's keys are the whole context
                k, v = key[start : start + q_len], value[start : start + q_len]
            else:
                table = meta.block_tables[seq, : -(-s_len // bs)]
                k = self._gather("k", key_cache, table).view(-1, num_kv_heads, head_dim)[:s_len]
                v = self._gather("v", value_cache, table).view(-1, num_kv_heads, head_dim)[:s_len]
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
