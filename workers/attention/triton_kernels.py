"""Triton kernels for paged attention: K/V read in place from the block pool, never gathered.

`store_kv` writes a step's new keys and values into their cache slots. `paged_attention` attends
a flattened mixed batch (prefill chunks over cached prefixes, decodes, speculative verification
rows) in one launch: each program takes a tile of one sequence's query tokens times the query
heads that share one KV head (GQA), walks that sequence's keys through its block table with an
online softmax, and applies the causal offset (a query at position p sees keys 0..p) and the
sliding window. With `num_splits > 1` (flash-decoding) the keys of each tile are cut into
ranges attended by separate programs, whose partial results `reduce_splits` merges: a small
batch with a long context then fills the GPU instead of a few of its cores.

Scores are kept in base 2 (scaled by log2(e)) so the softmax uses exp2. With TRITON_INTERPRET=1
the same kernels run on CPU tensors, which is how they are tested without a GPU.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
MIN_DOT = 16  # tl.dot wants every dimension >= 16


@triton.jit
def _store_kv_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_slot,
    stride_head,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token)
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    # A negative slot marks a padding token (a CUDA graph's unused batch rows): no write.
    slots = tl.zeros([BLOCK_H, BLOCK_D], tl.int64) + slot
    mask = (heads < NUM_KV_HEADS) & (dims < HEAD_DIM) & (slots >= 0)
    dest = tl.maximum(slot, 0) * stride_slot + heads * stride_head + dims
    key = tl.load(key_ptr + token * stride_kt + heads * stride_kh + dims, mask=mask)
    tl.store(k_cache_ptr + dest, key, mask=mask)
    value = tl.load(value_ptr + token * stride_vt + heads * stride_vh + dims, mask=mask)
    tl.store(v_cache_ptr + dest, value, mask=mask)


@triton.jit
def _paged_attention_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    part_acc_ptr,
    part_ml_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_ptr,
    tile_seq_ptr,
    tile_first_ptr,
    scale_log2,
    window,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_table,
    stride_slot,
    stride_head,
    stride_pa_split,
    stride_pa_token,
    stride_pml_split,
    stride_pml_token,
    NUM_HEADS: tl.constexpr,
    QUERIES_PER_KV: tl.constexpr,
    QPK_PADDED: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_IN_F32: tl.constexpr,
):
    BLOCK_M: tl.constexpr = BLOCK_Q * QPK_PADDED
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq = tl.load(tile_seq_ptr + tile)
    first = tl.load(tile_first_ptr + tile)  # the tile's first query, counted in its sequence
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    context = tl.load(seq_lens_ptr + seq) - q_len  # keys that precede this step's queries

    # Row r of the tile: query token first + r // QPK_PADDED, head r % QPK_PADDED of the group.
    rows = tl.arange(0, BLOCK_M)
    q_idx = first + rows // QPK_PADDED
    in_group = rows % QPK_PADDED
    row_ok = (q_idx < q_len) & (in_group < QUERIES_PER_KV)
    head = kv_head * QUERIES_PER_KV + in_group
    q_pos = context + q_idx
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    token = q_start + q_idx
    q = tl.load(
        q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
        mask=row_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )
    if DOT_IN_F32:
        q = q.to(tl.float32)

    # Keys the tile can see: up to its last query's position, from its first query's window.
    hi = context + tl.minimum(first + BLOCK_Q, q_len)
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(context + first - window + 1, 0)
    if NUM_SPLITS > 1:
        per_split = tl.cdiv(tl.cdiv(hi - lo, BLOCK_N), NUM_SPLITS) * BLOCK_N
        lo = lo + split * per_split
        hi = tl.minimum(hi, lo + per_split)

    m = tl.full([BLOCK_M], -1.0e30, tl.float32)  # finite, so fully masked rows stay at 0
    denom = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table = block_tables_ptr + seq * stride_table
    for start in range(lo, hi, BLOCK_N):
        k_pos = start + tl.arange(0, BLOCK_N)
        k_ok = k_pos < hi
        block = tl.load(table + k_pos // BLOCK_SIZE, mask=k_ok, other=0)
        slot = block.to(tl.int64) * BLOCK_SIZE + k_pos % BLOCK_SIZE
        offsets = slot[:, None] * stride_slot + kv_head * stride_head + dims[None, :]
        kv_mask = k_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_cache_ptr + offsets, mask=kv_mask, other=0.0)
        if DOT_IN_F32:
            k = k.to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        visible = k_ok[None, :] & (k_pos[None, :] <= q_pos[:, None])
        if USE_WINDOW:
            visible = visible & (k_pos[None, :] > q_pos[:, None] - window)
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(scores - m_new[:, None])
        denom = denom * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + offsets, mask=kv_mask, other=0.0)
        if DOT_IN_F32:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new

    if NUM_SPLITS == 1:
        out = acc / tl.where(row_ok, denom, 1.0)[:, None]
        tl.store(
            out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=row_ok[:, None] & dim_ok[None, :],
        )
    else:
        # Unnormalised partials; the row max and sum sit side by side in part_ml.
        acc_at = split * stride_pa_split + token[:, None] * stride_pa_token
        acc_at += (head[:, None] * HEAD_DIM + dims[None, :]).to(tl.int64)
        tl.store(part_acc_ptr + acc_at, acc, mask=row_ok[:, None] & dim_ok[None, :])
        ml_at = split * stride_pml_split + token * stride_pml_token + head * 2
        tl.store(part_ml_ptr + ml_at, m, mask=row_ok)
        tl.store(part_ml_ptr + ml_at + 1, denom, mask=row_ok)


@triton.jit
def _reduce_splits_kernel(
    part_acc_ptr,
    part_ml_ptr,
    out_ptr,
    stride_pa_split,
    stride_pa_token,
    stride_pml_split,
    stride_pml_token,
    stride_ot,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    token = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, NUM_SPLITS)
    dims = tl.arange(0, BLOCK_D)
    ml_at = splits * stride_pml_split + token * stride_pml_token + head * 2
    m = tl.load(part_ml_ptr + ml_at)
    denom = tl.load(part_ml_ptr + ml_at + 1)
    weight = tl.exp2(m - tl.max(m, 0))
    total = tl.sum(weight * denom, 0)
    acc_at = splits[:, None] * stride_pa_split + token * stride_pa_token
    acc_at += head * HEAD_DIM + dims[None, :]
    acc = tl.load(part_acc_ptr + acc_at, mask=(dims < HEAD_DIM)[None, :], other=0.0)
    out = tl.sum(acc * weight[:, None], 0) / total
    tl.store(
        out_ptr + token * stride_ot + head * stride_oh + dims,
        out.to(out_ptr.dtype.element_ty),
        mask=dims < HEAD_DIM,
    )


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def store_kv(
    key: torch.Tensor,  # [T, kv_heads, head_dim], last dim contiguous
    value: torch.Tensor,
    key_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim], contiguous
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T] int64; -1 for padding tokens
) -> None:
    """Write each token's key and value into its cache slot."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        key,
        value,
        key_cache,
        value_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        key_cache.stride(1),
        key_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_H=_pow2(num_kv_heads),
        BLOCK_D=_pow2(head_dim),
    )


def tile_queries(num_queries_per_kv: int, max_query_len: int) -> int:
    """Query tokens per program: enough rows (tokens x grouped heads) for tensor cores, and no
    more than the longest query needs."""
    per_tile = max(1, 64 // _pow2(num_queries_per_kv))
    least = max(1, MIN_DOT // _pow2(num_queries_per_kv))
    return max(least, min(per_tile, _pow2(max_query_len)))


def paged_attention(
    query: torch.Tensor,  # [T, heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
    value_cache: torch.Tensor,
    out: torch.Tensor,  # [T, heads, head_dim]
    block_tables: torch.Tensor,  # [B, max_blocks]
    seq_lens: torch.Tensor,  # [B] on query's device
    query_start_loc: torch.Tensor,  # [B + 1] on query's device
    tile_seq: torch.Tensor,  # [tiles] the sequence of each tile
    tile_first: torch.Tensor,  # [tiles] its first query token, counted in its sequence
    block_q: int,  # query tokens per tile (tile_queries)
    scale: float,
    sliding_window: int | None = None,
    num_splits: int = 1,
    partials: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Causal attention of every query over its sequence's paged keys, written into `out`.

    With `num_splits > 1` (a power of two), `partials` are float32 scratch tensors of shapes
    [num_splits, T, heads * head_dim] and [num_splits, T, heads * 2] (allocated here if None).
    """
    num_tokens, num_heads, head_dim = query.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads do not group over {num_kv_heads} KV heads")
    if num_splits & (num_splits - 1):
        raise ValueError(f"num_splits must be a power of two, got {num_splits}")
    group = num_heads // num_kv_heads
    if num_splits > 1 and partials is None:
        partials = (
            torch.empty(num_splits, num_tokens, num_heads * head_dim, device=query.device),
            torch.empty(num_splits, num_tokens, num_heads * 2, device=query.device),
        )
    part_acc, part_ml = partials if num_splits > 1 else (out, out)
    grid = (tile_seq.shape[0], num_kv_heads, num_splits)
    _paged_attention_kernel[grid](
        query,
        key_cache,
        value_cache,
        out,
        part_acc,
        part_ml,
        block_tables,
        seq_lens,
        query_start_loc,
        tile_seq,
        tile_first,
        scale * LOG2E,
        sliding_window or 0,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        block_tables.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        part_acc.stride(0) if num_splits > 1 else 0,
        part_acc.stride(1) if num_splits > 1 else 0,
        part_ml.stride(0) if num_splits > 1 else 0,
        part_ml.stride(1) if num_splits > 1 else 0,
        NUM_HEADS=num_heads,
        QUERIES_PER_KV=group,
        QPK_PADDED=_pow2(group),
        BLOCK_Q=block_q,
        BLOCK_N=max(MIN_DOT, _pow2(block_size)),
        BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim,
        BLOCK_D=max(MIN_DOT, _pow2(head_dim)),
        NUM_SPLITS=num_splits,
        USE_WINDOW=sliding_window is not None,
        # float32 stays exact (no TF32); half-precision dots have one precision anyway.
        PRECISION="ieee" if query.dtype == torch.float32 else None,
        # Triton's CPU interpreter computes half-precision dots wrongly: upcast there.
        DOT_IN_F32=query.device.type == "cpu",
    )
    if num_splits > 1:
        _reduce_splits_kernel[(num_tokens, num_heads)](
            part_acc,
            part_ml,
            out,
            part_acc.stride(0),
            part_acc.stride(1),
            part_ml.stride(0),
            part_ml.stride(1),
            out.stride(0),
            out.stride(1),
            HEAD_DIM=head_dim,
            BLOCK_D=_pow2(head_dim),
            NUM_SPLITS=num_splits,
        )
    return out
