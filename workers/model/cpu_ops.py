"""Fused decoder-layer elementwise ops for float32 CPU tensors (workers/native/layer_ops.c).

Each replaces several eager torch kernels that would each stream the whole activation through
memory (see the C file); `usable` says when they apply, and the model keeps its plain torch
code for everything else (other devices and dtypes, or no C compiler on the machine).
"""

from __future__ import annotations

from functools import cache

import torch

from workers import native


@cache
def _library():
    library = native.load("layer_ops.c")
    if library is None:
        return None
    i64, ptr, f32 = native.I64, native.PTR, native.F32
    return {
        "add_rms_norm": native.declare(
            library, "manta_add_rms_norm_f32", [ptr, ptr, ptr, ptr, i64, i64, f32, i64]
        ),
        "rotary": native.declare(
            library,
            "manta_rotary_f32",
            [ptr, i64, i64, i64, ptr, i64, i64, i64, ptr, ptr, ptr, i64, i64, i64],
        ),
        "silu_mul": native.declare(library, "manta_silu_mul_f32", [ptr, ptr, i64, i64, i64]),
    }


def usable(x: torch.Tensor) -> bool:
    """Whether the fused ops serve this activation (float32, on the CPU, built here)."""
    return x.dtype == torch.float32 and x.device.type == "cpu" and _library() is not None


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """RMSNorm of x [T, D], or of residual + x with the sum written back into residual."""
    _check_rows(x, residual, weight)
    out = torch.empty_like(x)
    _library()["add_rms_norm"](
        x.data_ptr(),
        None if residual is None else residual.data_ptr(),
        weight.data_ptr(),
        out.data_ptr(),
        x.shape[0],
        x.shape[1],
        eps,
        torch.get_num_threads(),
    )
    return out


def checked_rotary_inputs(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """The layout the rotary kernels (C and Triton) read; returns positions made contiguous."""
    for t in (q, k):
        if t.stride(-1) != 1:
            raise ValueError("rotary needs q and k with contiguous head_dim")
    positions = positions.contiguous()
    if not (cos.is_contiguous() and sin.is_contiguous() and positions.dtype == torch.int64):
        raise ValueError("rotary needs contiguous cos/sin tables and int64 positions")
    return positions


def rotary(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> None:
    """Rotate q [T, Hq, D] and k [T, Hk, D] in place by their tokens' positions."""
    positions = checked_rotary_inputs(q, k, positions, cos, sin)  # held: read by raw pointer
    _library()["rotary"](
        q.data_ptr(),
        q.stride(0),
        q.stride(1),
        q.shape[1],
        k.data_ptr(),
        k.stride(0),
        k.stride(1),
        k.shape[1],
        positions.data_ptr(),
        cos.data_ptr(),
        sin.data_ptr(),
        q.shape[0],
        q.shape[2],
        torch.get_num_threads(),
    )


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up [T, 2I] = [gate | up]."""
    _check_rows(gate_up)
    rows, inner = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(rows, inner, dtype=gate_up.dtype)
    _library()["silu_mul"](gate_up.data_ptr(), out.data_ptr(), rows, inner, torch.get_num_threads())
    return out


def _check_rows(*tensors: torch.Tensor | None) -> None:
    for t in tensors:
        if t is not None and not t.is_contiguous():
            raise ValueError("fused CPU ops need contiguous tensors")
