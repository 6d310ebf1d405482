"""The routing benchmark in quick mode, on real Ray and Serve: every policy and metric is
reported, finite, and prefix routing beats round-robin on prefix-cache hits.

It runs as its own process: it starts and stops Ray itself, which must not meet the Ray
instance that other tests in the session may hold.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks.routing import BURSTY_SERVED, POLICIES, SERVED

ROOT = Path(__file__).resolve().parents[1]

SERVED_METRICS = (
    "hit_rate",
    "ttft_p50_s",
    "ttft_p99_s",
    "output_tokens_per_s",
    "requests_per_s",
    "makespan_s",
)
RATIOS = ("vs_round_robin", "vs_oracle")


@pytest.fixture(scope="module")
def results(tiny_model, tmp_path_factory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench") / "routing.json"
    command = [sys.executable, "-m", "benchmarks.routing", "--quick", "--model", tiny_model]
    subprocess.run([*command, "--out", str(out)], cwd=ROOT, check=True, timeout=300)
    return json.loads(out.read_text())


def test_every_policy_has_finite_metrics(results: dict[str, Any]) -> None:
    policies = results["policies"]
    assert set(policies) == set(POLICIES)
    num_workers = results["settings"]["num_workers"]
    for policy, metrics in policies.items():
        keys = SERVED_METRICS if policy in SERVED else ("hit_rate",)
        for key in (*keys, *RATIOS):
            assert math.isfinite(metrics[key]), (policy, key)
            assert metrics[key] > 0, (policy, key)
        assert 0 <= metrics["hit_rate"] <= 1
        spread = metrics["requests_per_worker"]
        assert len(spread) == num_workers
        assert sum(spread) == results["settings"]["num_requests"]


def test_ttft_quantiles_are_ordered(results: dict[str, Any]) -> None:
    for policy in SERVED:
        metrics = results["policies"][policy]
        assert metrics["ttft_p50_s"] <= metrics["ttft_p99_s"]


def test_prefix_routing_beats_round_robin(results: dict[str, Any]) -> None:
    policies = results["policies"]
    assert policies["prefix"]["hit_rate"] > policies["round_robin"]["hit_rate"]
    assert policies["oracle"]["vs_oracle"] == 1


def test_simulated_round_robin_is_reported(results: dict[str, Any]) -> None:
    assert 0 <= results["simulated"]["round_robin"]["hit_rate"] <= 1


@pytest.fixture(scope="module")
def bursty(tiny_model, tmp_path_factory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench") / "routing-bursty.json"
    command = [sys.executable, "-m", "benchmarks.routing", "--mix", "bursty", "--quick"]
    command += ["--model", tiny_model, "--out", str(out)]
    subprocess.run(command, cwd=ROOT, check=True, timeout=300)
    return json.loads(out.read_text())


def test_bursty_mix_serves_every_request_under_both_policies(bursty: dict[str, Any]) -> None:
    """The prefix score and predicted-latency routing each stream the whole open-loop trace
    (with a surge from one tenant) and keep its shared prompts cached."""
    policies = bursty["policies"]
    assert set(policies) == set(BURSTY_SERVED)
    for policy, metrics in policies.items():
        assert 0 < metrics["within_slo"] <= 1, policy
        assert metrics["goodput_rps"] > 0, policy
        # 8 tenants' 256-token prompts, each ~290 tokens long: most of a prompt is shared.
        assert 0.5 < metrics["hit_rate"] <= 1, policy
        assert metrics["ttft_p50_s"] <= metrics["ttft_p99_s"]
        assert math.isfinite(metrics["goodput_vs_prefix"])
    assert policies["prefix"]["goodput_vs_prefix"] == 1
    (run,) = bursty["runs"]  # quick: one run, and the means are that run's figures
    assert run["predicted_latency"]["goodput_rps"] == policies["predicted_latency"]["goodput_rps"]
    assert bursty["settings"]["requests_per_run"] == [bursty["settings"]["num_requests"]]
