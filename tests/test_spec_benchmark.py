"""The speculative decoding benchmark in quick mode on the tiny preset: every row is reported
with finite, positive numbers, speculation never changed a greedy token, and the best draft
really emits several tokens per target step."""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

import pytest
import torch

from benchmarks.spec_decode import CALIBRATION, MODES, Settings, main
from tests.bench_checks import numbers

POSITIVE = ("tokens_per_s", "cpu_tokens_per_s", "mean_latency_s", "output_tokens")
RATIOS = ("tokens_per_s_ratio", "cpu_tokens_per_s_ratio")


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench") / "spec_decode.json"
    threads = torch.get_num_threads()
    try:
        assert main(["--quick", "--preset", "tiny", "--threads", "1", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return json.loads(out.read_text())


@pytest.mark.slow
def test_every_row_is_reported_with_positive_numbers(results):
    settings = results["settings"]
    assert results["machine"]["torch_threads"] == 1
    levels = results["draft"]
    assert [level["nominal_acceptance"] for level in levels] == list(CALIBRATION["tiny"].scales)
    parts = [(level["rows"], settings["batches"]) for level in levels]
    parts.append((results["ngram"]["rows"], settings["ngram_batches"]))
    for rows, batches in parts:
        assert [row["batch"] for row in rows] == list(batches)
        for row in rows:
            for mode in MODES:
                for key in POSITIVE:
                    value = row[mode][key]
                    assert math.isfinite(value) and value > 0, (row["batch"], mode, key, value)
                assert row[mode]["output_tokens"] == row["batch"] * settings["output_len"]
            for mode in MODES[1:]:
                assert all(row[mode][key] > 0 for key in RATIOS)
    assert all(math.isfinite(x) for x in numbers(results))


@pytest.mark.slow
def test_speculation_never_changes_greedy_tokens(results):
    assert results["mismatches"] == 0
    for part in [*results["draft"], results["ngram"]]:
        for row in part["rows"]:
            assert all(row[mode]["mismatches"] == 0 for mode in MODES)


@pytest.mark.slow
def test_acceptance_follows_the_calibration_and_a_good_draft_pays_per_step(results):
    measured = [level["measured_acceptance"] for level in results["draft"]]
    assert measured == sorted(measured) and 0 < measured[0] and measured[-1] <= 1
    best = results["draft"][-1]["rows"][0]
    assert best["batch"] == 1
    assert best["fixed"]["mean_accepted_length"] > 1
    assert best["fixed"]["tokens_per_request_step"] > 1


def test_quick_keeps_every_row_and_shortens_the_run():
    args = argparse.Namespace(preset="tiny", quick=True, seed=0)
    quick, full = Settings.from_args(args), Settings(preset="tiny")
    assert (quick.batches, quick.ngram_batches) == (full.batches, full.ngram_batches)
    assert quick.output_len < full.output_len and quick.repeats < full.repeats
