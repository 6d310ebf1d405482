"""The CPU paged-attention kernel (workers/native/paged_attention.c), called through ctypes.

Gathering every sequence's blocks into a contiguous copy each layer, as the pure-torch path
does, moves the whole context through memory three times (read, write, read again); the
kernel reads it once, in place. It is built on first use (workers/native); without a C
compiler the backend keeps the torch path.
"""

from __future__ import annotations

from functools import cache

import torch

from workers import native


@cache
def _kernel():
    """The kernel function, or None if it cannot be built here."""
    library = native.load("paged_attention.c")
    if library is None:
        return None
    i64, ptr = native.I64, native.PTR
    args = [ptr, i64, i64, ptr, ptr, ptr, i64, ptr, ptr, ptr, i64, ptr, i64, i64]
    args += [i64, i64, i64, i64, native.F32, i64, i64]
    return native.declare(library, "manta_paged_attention_f32", args, native.INT)


def available() -> bool:
    return _kernel() is not None


def paged_attention(
    query: torch.Tensor,  # [T, num_heads, head_dim] float32, head_dim contiguous
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], contiguous
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int64, rows contiguous
    query_start_loc: torch.Tensor,  # [B + 1] int64
    seq_lens: torch.Tensor,  # [B] int64
    seqs: torch.Tensor,  # [S] int64: which sequences to compute
    out: torch.Tensor,  # [T, num_heads, head_dim] float32, written for the chosen sequences
    scale: float,
    sliding_window: int | None,
) -> None:
    """Causal attention of the chosen sequences' query tokens over their paged contexts."""
    fn = _kernel()
    if fn is None:
        raise RuntimeError("the CPU attention kernel is not available (no C compiler)")
    for name, t in (("query", query), ("key_cache", key_cache), ("value_cache", value_cache)):
        if t.dtype != torch.float32 or t.device.type != "cpu" or t.stride(-1) != 1:
            raise ValueError(f"{name} must be a float32 CPU tensor with contiguous head_dim")
    if not (key_cache.is_contiguous() and value_cache.is_contiguous()):
        raise ValueError("the KV caches must be contiguous")
    for t in (block_tables, query_start_loc, seq_lens, seqs):
        if t.dtype != torch.int64 or (t.stride(-1) != 1 and t.shape[-1] > 1):
            raise ValueError("block tables, query starts, sequence lengths must be int64")
    _, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    status = fn(
        query.data_ptr(),
        query.stride(0),
        query.stride(1),
        key_cache.data_ptr(),
        value_cache.data_ptr(),
        block_tables.data_ptr(),
        block_tables.stride(0),
        query_start_loc.data_ptr(),
        seq_lens.data_ptr(),
        seqs.data_ptr(),
        seqs.numel(),
        out.data_ptr(),
        out.stride(0),
        out.stride(1),
        num_heads,
        num_kv_heads,
        head_dim,
        block_size,
        scale,
        sliding_window or 0,
        torch.get_num_threads(),
    )
    if status != 0:
        raise MemoryError("the CPU attention kernel could not allocate its scratch memory")
