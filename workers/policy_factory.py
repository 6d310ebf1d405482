"""Builds a batching policy by name: the engine's, the simulator's and the benchmarks' one way."""

from __future__ import annotations

from pathlib import Path

from workers.batching_policy import (
    AdaptiveBatchingPolicy,
    BatchingPolicy,
    FixedBatchingPolicy,
    StepTimeModel,
)
from workers.learned_policy import DEFAULT_PARAMS_PATH, LearnedBatchingPolicy, LearnedParams

POLICIES = ("fixed", "adaptive", "learned")


def make_batching_policy(
    kind: str,
    max_num_batched_tokens: int,
    max_num_seqs: int,
    step_time: StepTimeModel,
    latency_weight: float = 1.0,
    learned: LearnedParams | str | Path | None = None,
) -> BatchingPolicy:
    """`learned`: the learned policy's parameters, or a file of them (default: the shipped one)."""
    if kind == "fixed":
        return FixedBatchingPolicy(max_num_batched_tokens, max_num_seqs)
    if kind == "adaptive":
        return AdaptiveBatchingPolicy(
            max_num_batched_tokens, max_num_seqs, step_time, latency_weight
        )
    if kind == "learned":
        params = learned
        if not isinstance(params, LearnedParams):
            params = LearnedParams.load(learned or DEFAULT_PARAMS_PATH)
        return LearnedBatchingPolicy(max_num_batched_tokens, max_num_seqs, step_time, params)
    raise ValueError(f"unknown batching policy {kind!r}; expected one of {', '.join(POLICIES)}")
