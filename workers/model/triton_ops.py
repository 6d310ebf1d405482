"""Fused decoder-layer elementwise ops as Triton kernels for GPU activations.

They mirror workers/model/cpu_ops.py (same signatures and semantics): each replaces several
eager torch kernels that would each stream the whole activation through memory. They round
where the model's torch code rounds, so bf16 results agree with it to within an ulp.

Triton is imported, and the kernels wrapped, only when a kernel is first launched: importing
this module neither needs triton nor imports it, so TRITON_INTERPRET=1 (which runs the kernels
on CPU tensors, for tests) still counts if it is set after the model code is imported.
"""

from __future__ import annotations

import importlib.util
import os
from functools import cache

import torch

from workers.model.cpu_ops import checked_rotary_inputs

tl = None  # triton.language, bound by _kernels(): the kernels below look it up as a global

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def usable(x: torch.Tensor) -> bool:
    """Whether the kernels serve this activation: on a GPU, or on the CPU under the
    interpreter, in a float dtype the kernels compute in float32."""
    if x.device.type == "cuda":
        device_ok = True
    else:
        interpret = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")
        device_ok = x.device.type == "cpu" and interpret
    return device_ok and x.dtype in _DTYPES and _triton_installed()


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """RMSNorm of x [T, D], or of residual + x with the sum written back into residual."""
    _check_rows(x, residual, weight)
    rows, width = x.shape
    out = torch.empty_like(x)
    block = _next_power_of_2(width)
    _kernels()["add_rms_norm"][(rows,)](
        x,
        x if residual is None else residual,
        weight,
        out,
        width,
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        num_warps=_num_warps(block),
    )
    return out


def rotary(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> None:
    """Rotate q [T, Hq, D] and k [T, Hk, D] in place by their tokens' positions."""
    positions = checked_rotary_inputs(q, k, positions, cos, sin)
    half = q.shape[2] // 2
    block_half = _next_power_of_2(half)
    for t in (q, k):  # two launches: one kernel per tensor keeps the kernel a single tile
        block_heads = _next_power_of_2(t.shape[1])
        _kernels()["rotary"][(t.shape[0],)](
            t,
            t.stride(0),
            t.stride(1),
            t.shape[1],
            positions,
            cos,
            sin,
            half,
            BLOCK_HEADS=block_heads,
            BLOCK_HALF=block_half,
            num_warps=_num_warps(block_heads * block_half),
        )


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up [T, 2I] = [gate | up]."""
    _check_rows(gate_up)
    rows, inner = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(rows, inner, dtype=gate_up.dtype, device=gate_up.device)
    block = _next_power_of_2(inner)
    _kernels()["silu_mul"][(rows,)](gate_up, out, inner, BLOCK=block, num_warps=_num_warps(block))
    return out


def _next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _num_warps(block: int) -> int:
    """A warp per 256 elements of a row's tile, from 1 to 16: enough loads in flight per row
    without spilling registers at Llama widths (a 16384-wide tile gets 16 warps)."""
    return min(max(block // 256, 1), 16)


def _check_rows(*tensors: torch.Tensor | None) -> None:
    for t in tensors:
        if t is not None and not t.is_contiguous():
            raise ValueError("fused Triton ops need contiguous tensors")


@cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


@cache
def _kernels() -> dict:
    """The kernels, wrapped when first launched. TRITON_INTERPRET is read when triton.jit wraps
    a function, not when it runs, and triton's own library (tl.sum among it) is wrapped when
    triton is first imported, so neither may happen before a test sets the flag."""
    global tl
    import triton
    import triton.language

    tl = triton.language
    return {
        "add_rms_norm": triton.jit(_add_rms_norm_kernel),
        "rotary": triton.jit(_rotary_kernel),
        "silu_mul": triton.jit(_silu_mul_kernel),
    }


# The kernels follow the torch code's roundings: each torch op on bf16 tensors computes in
# float32 and rounds its result to bf16, so the kernels cast to the input dtype at the same
# points (the casts are free for float32 inputs).


def _add_rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    width,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < width
    x = tl.load(x_ptr + row * width + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * width + cols, mask=mask, other=0.0)
        h = (residual.to(tl.float32) + x.to(tl.float32)).to(residual_ptr.dtype.element_ty)
        tl.store(residual_ptr + row * width + cols, h, mask=mask)
    else:
        h = x
    h32 = h.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(h32 * h32, axis=0) / width + eps)
    normed = (h32 * rstd).to(h.dtype).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(
        out_ptr + row * width + cols, (weight * normed).to(out_ptr.dtype.element_ty), mask=mask
    )


def _rotary_kernel(
    x_ptr,
    stride_token,
    stride_head,
    heads,
    positions_ptr,
    cos_ptr,
    sin_ptr,
    half,
    BLOCK_HEADS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    """x[..., :half], x[..., half:] <- x1 * cos1 - x2 * sin1, x2 * cos2 + x1 * sin2: the
    rotate-half (NeoX) form, over every head of one token."""
    token = tl.program_id(0).to(tl.int64)
    dtype = x_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK_HALF)
    col_mask = cols < half
    table = tl.load(positions_ptr + token) * 2 * half + cols
    # [BLOCK_HALF] rows of the tables, broadcast over the heads
    cos1 = tl.load(cos_ptr + table, mask=col_mask, other=0.0).to(dtype).to(tl.float32)
    sin1 = tl.load(sin_ptr + table, mask=col_mask, other=0.0).to(dtype).to(tl.float32)
    cos2 = tl.load(cos_ptr + table + half, mask=col_mask, other=0.0).to(dtype).to(tl.float32)
    sin2 = tl.load(sin_ptr + table + half, mask=col_mask, other=0.0).to(dtype).to(tl.float32)
    head_ids = tl.arange(0, BLOCK_HEADS)[:, None]
    mask = (head_ids < heads) & col_mask[None, :]
    first = x_ptr + token * stride_token + head_ids * stride_head + cols[None, :]
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + half, mask=mask, other=0.0).to(tl.float32)
    out1 = (x1 * cos1).to(dtype).to(tl.float32) - (x2 * sin1).to(dtype).to(tl.float32)
    out2 = (x2 * cos2).to(dtype).to(tl.float32) + (x1 * sin2).to(dtype).to(tl.float32)
    tl.store(first, out1.to(dtype), mask=mask)
    tl.store(first + half, out2.to(dtype), mask=mask)


def _silu_mul_kernel(gate_up_ptr, out_ptr, inner, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < inner
    dtype = out_ptr.dtype.element_ty
    gate = tl.load(gate_up_ptr + row * 2 * inner + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * 2 * inner + inner + cols, mask=mask, other=0.0)
    silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * inner + cols, (silu * up.to(tl.float32)).to(dtype), mask=mask)
