"""The batching policies: fixed limits, the fitted step-time model, and the adaptive choice."""

from __future__ import annotations

import math

import pytest

from workers.batching_policy import (
    AdaptiveBatchingPolicy,
    FixedBatchingPolicy,
    QueueSnapshot,
    StepTimeModel,
)


def snapshot(running: int, waiting: int, waiting_tokens: int) -> QueueSnapshot:
    return QueueSnapshot(running, waiting, waiting_tokens, num_free_blocks=100)


def trained(overhead: float = 0.03, per_token: float = 0.002) -> AdaptiveBatchingPolicy:
    step_time = StepTimeModel()  # shared with the engine, which feeds it every step
    policy = AdaptiveBatchingPolicy(2048, 64, step_time)
    for tokens in (1, 8, 64, 300, 17, 900, 2, 128) * 5:
        step_time.observe(tokens, overhead + per_token * tokens)
    return policy


def test_fixed_policy_returns_its_settings():
    limits = FixedBatchingPolicy(512, 16).limits(snapshot(10, 10, 5000))
    assert (limits.max_num_batched_tokens, limits.max_num_seqs) == (512, 16)


def test_step_time_model_recovers_a_linear_cost():
    model = StepTimeModel()
    for tokens in (1, 10, 100, 1000, 50) * 10:
        model.observe(tokens, 0.02 + 0.001 * tokens)
    assert model.overhead == pytest.approx(0.02, rel=1e-3)
    assert model.per_token == pytest.approx(0.001, rel=1e-3)
    assert model.seconds(200) == pytest.approx(0.22, rel=1e-3)


def test_full_budget_when_no_latency_is_at_stake():
    policy = trained()
    assert policy.limits(snapshot(0, 30, 9000)).max_num_batched_tokens == 2048  # nothing decodes
    assert policy.limits(snapshot(40, 0, 0)).max_num_batched_tokens == 2048  # nothing waits
    policy.latency_weight = 0.0  # only the queue's latency counts (a setting the config allows)
    assert policy.limits(snapshot(40, 30, 9000)).max_num_batched_tokens == 2048


def test_chunk_minimises_the_stated_cost():
    policy = trained()
    a, b = policy.model.overhead, policy.model.per_token
    decoding, waiting, tokens = 16, 8, 2400

    def cost(chunk: int) -> float:
        step = a + b * (decoding + chunk)
        return decoding * step + waiting * tokens / chunk * step

    budget = policy.limits(snapshot(decoding, waiting, tokens)).max_num_batched_tokens
    chunk = budget - decoding
    assert all(cost(chunk) <= cost(other) + 1e-9 for other in (chunk // 2, chunk * 2, 32, 1000))
    assert chunk == int(math.sqrt(waiting * tokens * (a + b * decoding) / (decoding * b)))


def test_more_backlog_larger_chunks_more_decodes_smaller_chunks():
    policy = trained()

    def chunk(decoding: int, waiting: int, tokens: int) -> int:
        return policy.limits(snapshot(decoding, waiting, tokens)).max_num_batched_tokens - decoding

    assert chunk(8, 2, 500) < chunk(8, 20, 5000)
    assert chunk(4, 10, 3000) > chunk(60, 10, 3000)
    assert chunk(64, 1, 10) == 32  # never below the minimum chunk
    assert policy.limits(snapshot(8, 500, 10**6)).max_num_batched_tokens == 2048  # capped
    assert policy.describe()["token_budget"] == 2048
