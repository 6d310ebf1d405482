"""Sizing the GPU's KV pool: the arithmetic, and the profiling pass at the largest step (which
runs on any device; only on CUDA does its peak memory feed the budget)."""

from __future__ import annotations

import pytest

from workers.memory_profile import kv_budget_bytes, profile_forward
from workers.model.loader import load_model

GIB = 2**30


def test_budget_is_what_the_weights_activations_and_context_leave():
    assert kv_budget_bytes(80 * GIB, 0.9, 20 * GIB, 2 * GIB) == 50 * GIB
    with pytest.raises(ValueError, match="raise gpu_memory_utilization"):
        kv_budget_bytes(24 * GIB, 0.5, 11 * GIB, 2 * GIB)


@pytest.mark.parametrize("num_tokens, num_seqs", [(100, 7), (5, 64), (33, 1)])
def test_profiling_pass_runs_the_largest_step(tiny_model, num_tokens, num_seqs):
    model = load_model(tiny_model)
    logits = profile_forward(model, num_tokens, num_seqs, block_size=16)
    assert logits.shape == (min(num_tokens, num_seqs), model.config.vocab_size)
    assert logits.isfinite().all()
