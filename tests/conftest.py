"""Shared fixtures: small random checkpoints built once per test session."""

from __future__ import annotations

import pytest

from workers.model.make_model import make_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A tiny Llama checkpoint with a real tokenizer, weights peaked enough that greedy
    choices are never decided by floating-point rounding."""
    path = tmp_path_factory.mktemp("tiny-llama")
    make_model(path, "tiny", "llama", seed=0, initializer_range=0.1)
    return str(path)
