"""The GPU check's `--cpu-smoke` run, so the script prepared for a GPU machine is known to
start: every section reports numbers, the kernels pass, and the engine's import path holds no
Ray, Redis or FastAPI (that machine has none of them)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = "benchmarks/gpu_check.py"
SECTIONS = ("environment", "baselines", "kernels", "bandwidth", "engine", "greedy", "imports")
FORBIDDEN = ("ray", "redis", "fastapi")


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def measured(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [row for row in rows if "skipped" not in row]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("gpu-check")
    command = [sys.executable, SCRIPT, "--cpu-smoke", "--out", str(out)]
    proc = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return {"stdout": proc.stdout, **json.loads((out / "gpu_check.json").read_text())}


def test_every_section_ran_without_error(smoke):
    for name in SECTIONS:
        assert name in smoke, name
        assert "error" not in smoke[name], (name, smoke[name]["error"])
    assert smoke["environment"]["cpu_smoke"] and smoke["environment"]["triton_interpret"]
    assert is_number(smoke["baselines"]["copy_bytes_per_s"])
    assert is_number(smoke["baselines"]["matmul_flops_per_s"])


def test_triton_kernel_matches_the_torch_reference(smoke):
    rows = measured(smoke["kernels"]["rows"])
    assert [(r["backend"], r["window"]) for r in rows] == [("triton", None), ("triton", 16)]
    for row in rows:
        assert "error" not in row, row
        assert is_number(row["max_abs_err"]) and is_number(row["cache_max_abs_err"]), row
        assert row["passed"], row
        assert row["cache_max_abs_err"] == 0.0


def test_decode_bandwidth_rows_have_numbers(smoke):
    rows = measured(smoke["bandwidth"]["rows"])
    assert {(r["batch"], r["context"]) for r in rows} == {(1, 64), (1, 256), (4, 64), (4, 256)}
    for row in rows:
        assert "error" not in row, row
        for key in ("seconds", "bytes_per_s", "copy_fraction"):
            assert is_number(row[key]) and row[key] > 0, (key, row)


def test_engine_rows_have_numbers_and_graphs_are_skipped_without_cuda(smoke):
    rows = smoke["engine"]["rows"]
    skipped = [row for row in rows if "skipped" in row]
    assert skipped == [{"model": "tiny", "cuda_graphs": True, "skipped": "skipped: no CUDA"}]
    ran = measured(rows)
    assert {(r["backend"], r["batch"]) for r in ran} == {
        (b, n) for b in ("triton", "torch") for n in (1, 4)
    }
    for row in ran:
        assert "error" not in row, row
        assert row["output_tokens"] == row["batch"] * smoke["engine"]["output_len"], row
        for key in ("output_tok_s", "decode_tok_s", "decode_ms_per_step", "weight_bound_fraction",
                    "matmul_peak_fraction"):  # fmt: skip
            assert is_number(row[key]) and row[key] > 0, (key, row)


def test_greedy_tokens_equal_transformers_in_float32(smoke):
    greedy = smoke["greedy"]
    assert greedy["equal_prompts"] == len(greedy["rows"]) == 2, greedy
    for row in greedy["rows"]:
        assert row["matching_steps"] == row["steps"] == 8 and row["first_divergence"] is None


def test_one_markdown_table_is_printed(smoke):
    lines = smoke["stdout"].splitlines()
    start = lines.index("| section | case | result | target | status |")
    table = [line for line in lines[start:] if line.startswith("|")]
    assert len(table) >= 2 + 2 + 3 + 5 + 5 + 3  # header, baselines, kernels, bandwidth, ...
    assert not [line for line in table if "ERROR" in line or "FAIL" in line]


def test_engine_import_path_holds_no_ray_redis_or_fastapi(smoke):
    assert smoke["imports"]["forbidden"] == []
    check = (
        "import sys, workers.llm; "
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({FORBIDDEN!r})))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", check], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_missing_pydantic_names_the_wheels_option(tmp_path):
    """Without pydantic the script stops before the engine, saying how to bring it."""
    hide = (
        "import runpy, sys; sys.modules['pydantic'] = None; "
        f"sys.argv = [{SCRIPT!r}, '--cpu-smoke', '--out', {str(tmp_path)!r}]; "
        f"runpy.run_path({SCRIPT!r}, run_name='__main__')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", hide], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0
    assert "--wheels DIR" in proc.stderr and "pydantic" in proc.stderr
    assert not (tmp_path / "gpu_check.json").exists()
