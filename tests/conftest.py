"""Shared fixtures: small random checkpoints built once per test session."""

from __future__ import annotations

import os

# Triton's interpreter runs its kernels on CPU tensors; it must be on before anything imports
# triton (transformers does, through torch._dynamo), since triton reads it when wrapping
# kernels, its own library's included. The model uses Triton only on CUDA tensors.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from workers.model.make_model import make_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A tiny Llama checkpoint with a real tokenizer, weights peaked enough that greedy
    choices are never decided by floating-point rounding."""
    path = tmp_path_factory.mktemp("tiny-llama")
    make_model(path, "tiny", "llama", seed=0, initializer_range=0.1)
    return str(path)
