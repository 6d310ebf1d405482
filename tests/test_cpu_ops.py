"""The fused CPU layer ops against the torch expressions they replace, and the model with them
against the model without them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from workers.model import cpu_ops
from workers.model.rope import _rotate_half


def test_the_fused_ops_are_built_here():
    # CI machines have a C compiler: a build failure must fail loudly, not fall back silently.
    assert cpu_ops.usable(torch.zeros(1))
    assert not cpu_ops.usable(torch.zeros(1, dtype=torch.float64))


@pytest.mark.parametrize("rows", [1, 7, 300])  # 300 x 96 crosses the threading threshold
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rms_norm(rows, with_residual):
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 96, generator=gen)
    residual = torch.randn(rows, 96, generator=gen) if with_residual else None
    weight = torch.randn(96, generator=gen)
    h = x + residual if with_residual else x.clone()
    expected = weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5))
    kept = residual.clone() if with_residual else None
    out = cpu_ops.add_rms_norm(x, residual, weight, 1e-5)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    if with_residual:
        torch.testing.assert_close(residual, kept + x)  # the sum is written back in place


@pytest.mark.parametrize("rows", [1, 5, 400])
def test_rotary_in_place_on_views_of_the_qkv_output(rows):
    gen = torch.Generator().manual_seed(rows)
    heads, kv_heads, dim, positions_max = 4, 2, 32, 512
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * dim, generator=gen)
    q = qkv[:, : heads * dim].view(rows, heads, dim)
    k = qkv[:, heads * dim : (heads + kv_heads) * dim].view(rows, kv_heads, dim)
    angles = torch.rand(positions_max, dim // 2, generator=gen) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    positions = torch.randint(0, positions_max, (rows,), generator=gen)
    c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
    expected_q = q * c + _rotate_half(q) * s
    expected_k = k * c + _rotate_half(k) * s
    v_before = qkv[:, (heads + kv_heads) * dim :].clone()
    cpu_ops.rotary(q, k, positions, cos, sin)
    torch.testing.assert_close(q, expected_q, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(k, expected_k, rtol=1e-5, atol=1e-6)
    assert torch.equal(qkv[:, (heads + kv_heads) * dim :], v_before)  # v is untouched


@pytest.mark.parametrize("rows", [1, 3, 200])
def test_silu_mul(rows):
    gen = torch.Generator().manual_seed(rows)
    gate_up = torch.randn(rows, 2 * 160, generator=gen) * 8  # far into both tails of SiLU
    gate_up[0, 0], gate_up[0, 1] = -200.0, 200.0
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(cpu_ops.silu_mul(gate_up), F.silu(gate) * up, rtol=1e-5, atol=1e-6)


def test_non_contiguous_inputs_are_refused():
    x = torch.randn(4, 16)[:, ::2]
    with pytest.raises(ValueError, match="contiguous"):
        cpu_ops.add_rms_norm(x, None, torch.ones(8), 1e-5)


def test_the_model_gives_the_same_logits_with_and_without_the_fused_ops(tiny_model, monkeypatch):
    from tests.paged_driver import PagedDriver
    from workers.model.loader import load_model

    model = load_model(tiny_model)
    prompts = {"a": list(range(5, 45)), "b": list(range(100, 117))}

    def run() -> dict[str, torch.Tensor]:
        driver = PagedDriver(model, block_size=4)
        for name, tokens in prompts.items():
            driver.add(name, tokens)
        return driver.step({name: len(tokens) for name, tokens in prompts.items()})

    fused = run()
    monkeypatch.setattr(cpu_ops, "usable", lambda x: False)
    plain = run()
    for name in prompts:
        torch.testing.assert_close(fused[name], plain[name], rtol=1e-4, atol=1e-4)
