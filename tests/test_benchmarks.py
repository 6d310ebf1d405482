"""The engine benchmark in quick mode on a tiny checkpoint: every metric is reported, finite and
positive, and Manta and the `transformers` baseline produce the same number of tokens."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
from collections import Counter
from typing import Any

import httpx
import pytest

from benchmarks.common import make_trace, sse_lines
from benchmarks.engine import RATIO_KEYS, Settings, main
from tests.bench_checks import numbers

SYSTEM_METRICS = [
    *RATIO_KEYS,
    "makespan_s",
    "output_tokens",
    "pool_utilization",
]
POSITIVE = {
    "manta": [
        *SYSTEM_METRICS,
        "allocation_calls",
        "allocated_blocks",
        "steps",
        "prefix_cache_hit_rate",
        "peak_kv_bytes",
        "pool_utilization_mean",
    ],
    "baseline": SYSTEM_METRICS,
    "ratios": list(RATIO_KEYS),
    "prefix_ttft": ["warm_s", "cold_s", "ratio"],
    "scheduler": ["cpu_us_per_step", "wall_us_per_step"],
    "roofline": [
        "matmul_flops_per_s",
        "prefill_flops_per_s",
        "decode_flops_per_s",
        "prefill_fraction",
        "decode_fraction",
    ],
}


@pytest.fixture(scope="module")
def results(tiny_model, tmp_path_factory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench") / "engine.json"
    assert main(["--quick", "--model", tiny_model, "--out", str(out)]) == 0
    return json.loads(out.read_text())


@pytest.mark.slow
def test_every_metric_is_finite_and_positive(results):
    for section, keys in POSITIVE.items():
        for key in keys:
            value = results[section][key]
            assert math.isfinite(value) and value > 0, (section, key, value)
    assert all(math.isfinite(x) for x in numbers(results))
    assert 0 < results["manta"]["pool_utilization"] <= 1
    assert 0 < results["baseline"]["pool_utilization"] <= 1


@pytest.mark.slow
def test_both_systems_produce_the_same_token_counts(results):
    counts = results["outputs"]
    assert len(counts["manta_token_counts"]) == results["settings"]["trace"]["num_requests"]
    assert counts["manta_token_counts"] == counts["baseline_token_counts"]
    low, high = results["settings"]["trace"]["output_len"]
    assert all(low <= n <= high for n in counts["manta_token_counts"])
    assert results["manta"]["output_tokens"] == results["baseline"]["output_tokens"]


def test_trace_is_seeded_with_shared_prompts_and_a_burst():
    args = argparse.Namespace(quick=False, num_requests=40, rate=None, seed=5)
    spec = Settings.from_args(args).trace
    trace = make_trace(spec, vocab_size=1024)
    assert trace == make_trace(spec, vocab_size=1024)
    assert len(trace) == 40 and trace[0].arrival_s == 0.0
    arrivals = [r.arrival_s for r in trace]
    assert arrivals == sorted(arrivals)
    assert max(Counter(arrivals).values()) == spec.burst + 1 == 11  # joins one arrival
    heads = Counter(tuple(r.prompt_ids[: spec.system_len]) for r in trace)
    assert heads.most_common(1)[0][1] == spec.num_requests // 2
    assert all(max(r.prompt_ids) < 1024 - 5 for r in trace)


def test_sse_lines_split_on_newlines_only():
    """A completion's text may hold U+2028 or U+0085 raw inside a JSON line: one line still."""
    text = "a\u2028b\x85c\x1cd"
    body = f"data: {json.dumps({'text': text}, ensure_ascii=False)}\n\ndata: [DONE]\n\n"
    response = httpx.Response(200, stream=httpx.ByteStream(body.encode()))

    async def lines() -> list[str]:
        return [line async for line in sse_lines(response)]

    got = asyncio.run(lines())
    assert got == [got[0], "", "data: [DONE]", ""]
    assert json.loads(got[0].removeprefix("data: "))["text"] == text
