"""The headless locust runner against the served app: a short load with no failures, and the
TTFT and inter-token latency it reports."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("served", ["redis"], indirect=True)
def test_locust_run_has_no_failures_and_reports_token_latencies(served, tmp_path):
    assert importlib.util.find_spec("locust") is not None, (
        'locust is missing: pip install -c constraints.txt -e ".[dev,load]"'
    )
    out = tmp_path / "report"
    command = [sys.executable, "-m", "loadtests.run", "--host", served.base_url]
    command += ["--model", served.model_name, "--users", "4", "--spawn-rate", "4"]
    command += ["--run-time", "6s", "--max-tokens", "16", "--tenants", "2", "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["requests"] > 0
    assert summary["failures"] == 0, done.stdout
    counts = {(r["type"], r["name"]): r["count"] for r in summary["rows"]}
    for kind in ("TTFT", "ITL"):
        assert counts.get((kind, "/v1/chat/completions"), 0) > 0, counts
    assert "TTFT" in done.stdout and (out / "report.html").is_file()
