"""The Triton layer ops against the torch code they replace, run on the CPU by Triton's
interpreter.

Each torch op on bf16 tensors computes in float32 and rounds its result to bf16 (to nearest),
so each reference below is written with those roundings explicit. With rounding to nearest it
equals the model's torch code bit for bit; with the interpreter's own float32 -> bf16 rounding
(Triton 3.9's truncates toward zero) the kernels must match it to the last bit, which shows
they round where the torch code does.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything below can wrap a kernel

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from workers.model import triton_ops  # noqa: E402
from workers.model.rope import _rotate_half  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16]


@triton.jit
def _to_bf16_kernel(x_ptr, out_ptr):
    tl.store(out_ptr, tl.load(x_ptr).to(tl.bfloat16))


def _interpreter_rounds_to_nearest() -> bool:
    x = torch.tensor([1 + 3 * 2**-9])  # between bf16's 1 and 1 + 2**-7, nearer the second
    out = torch.empty(1, dtype=torch.bfloat16)
    _to_bf16_kernel[(1,)](x, out)
    return out.item() > 1


INTERPRETER_ROUNDS_TO_NEAREST = _interpreter_rounds_to_nearest()


def nearest(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype)


def like_the_interpreter(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.float32 or INTERPRETER_ROUNDS_TO_NEAREST:
        return t.to(dtype)
    return (t.view(torch.int32) & ~0xFFFF).view(torch.float32).to(dtype)  # exact: low bits cut


def assert_matches(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal to a float32 ulp or so, which may tip a bf16 rounding by one ulp (float32 exp
    and rsqrt differ in their last bit between numpy and torch)."""
    assert actual.dtype == expected.dtype
    rtol = 1e-6 if actual.dtype == torch.float32 else 2**-7
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=1e-6)


def test_usable_on_cpu_only_under_the_interpreter(monkeypatch):
    assert triton_ops.usable(torch.zeros(1, dtype=torch.bfloat16))
    assert not triton_ops.usable(torch.zeros(1, dtype=torch.int64))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not triton_ops.usable(torch.zeros(1))


def rms_norm(x, residual, weight, eps, rnd):
    h = x if residual is None else rnd(residual.float() + x.float(), x.dtype)
    h32 = h.float()
    h32 = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)
    return rnd(weight.float() * rnd(h32, x.dtype).float(), x.dtype), h


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [64, 96, 128])
@pytest.mark.parametrize("rows", [1, 7])
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rms_norm(dtype, width, rows, with_residual):
    gen = torch.Generator().manual_seed(width + rows)
    x = torch.randn(rows, width, generator=gen).to(dtype)
    residual = torch.randn(rows, width, generator=gen).to(dtype) if with_residual else None
    weight = (torch.randn(width, generator=gen) + 1).to(dtype)
    # workers/model/llama.py RMSNorm.forward's torch path
    h = x if residual is None else residual + x
    h32 = h.float()
    h32 = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + 1e-5)
    torch_out = weight * h32.to(h.dtype)
    assert torch.equal(rms_norm(x, residual, weight, 1e-5, nearest)[0], torch_out)

    expected, expected_sum = rms_norm(x, residual, weight, 1e-5, like_the_interpreter)
    out = triton_ops.add_rms_norm(x, residual, weight, 1e-5)
    assert_matches(out, expected)
    if with_residual:
        assert torch.equal(residual, expected_sum)  # the sum is written back in place


def rotate(x, cos, sin, rnd):
    c, s = rnd(cos, x.dtype).float(), rnd(sin, x.dtype).float()
    first, second = x.float() * c, _rotate_half(x).float() * s
    return rnd(rnd(first, x.dtype).float() + rnd(second, x.dtype).float(), x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [64, 96, 128])
@pytest.mark.parametrize("rows", [1, 7])
def test_rotary_in_place_on_views_of_the_qkv_output(dtype, dim, rows):
    gen = torch.Generator().manual_seed(dim + rows)
    heads, kv_heads, max_positions = 8, 2, 64  # grouped-query attention: 4 q heads per kv head
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * dim, generator=gen).to(dtype)
    q, k, v = qkv.view(rows, heads + 2 * kv_heads, dim).split([heads, kv_heads, kv_heads], 1)
    assert q.stride(0) == k.stride(0) == (heads + 2 * kv_heads) * dim  # rows of the fused qkv
    angles = torch.rand(max_positions, dim // 2, generator=gen) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    positions = torch.randint(0, max_positions, (rows,), generator=gen)
    c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
    # workers/model/rope.py RotaryEmbedding.forward's torch path
    torch_q = q * c.to(dtype) + _rotate_half(q) * s.to(dtype)
    assert torch.equal(rotate(q, c, s, nearest), torch_q)

    expected_q = rotate(q, c, s, like_the_interpreter)
    expected_k = rotate(k, c, s, like_the_interpreter)
    v_before = v.clone()
    triton_ops.rotary(q, k, positions, cos, sin)
    torch.testing.assert_close(q, expected_q, rtol=0, atol=0)  # products of bf16s are exact
    torch.testing.assert_close(k, expected_k, rtol=0, atol=0)
    assert torch.equal(v, v_before)  # v is untouched


def silu_mul(gate_up, rnd):
    gate, up = gate_up.float().chunk(2, dim=-1)
    return rnd(rnd(F.silu(gate), gate_up.dtype).float() * up, gate_up.dtype)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # exp(200) = inf, as meant
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inner", [64, 96, 128])
@pytest.mark.parametrize("rows", [1, 7])
def test_silu_mul(dtype, inner, rows):
    gen = torch.Generator().manual_seed(inner + rows)
    gate_up = torch.randn(rows, 2 * inner, generator=gen) * 8  # far into both tails of SiLU
    gate_up[0, 0], gate_up[0, 1] = -200.0, 200.0
    gate_up = gate_up.to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    assert torch.equal(silu_mul(gate_up, nearest), F.silu(gate) * up)  # llama.py MLP's path
    assert_matches(triton_ops.silu_mul(gate_up), silu_mul(gate_up, like_the_interpreter))


def test_non_contiguous_inputs_are_refused():
    x = torch.randn(4, 16)[:, ::2]
    with pytest.raises(ValueError, match="contiguous"):
        triton_ops.add_rms_norm(x, None, torch.ones(8), 1e-5)
