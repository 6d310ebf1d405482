"""The tracing benchmark, briefly run on real Ray and Serve with its collector in a process of
its own: both modes are timed round by round, and every traced request reached the collector
as one trace holding the router's and the worker's spans.

It runs as its own process: it starts and stops Ray itself, which must not meet the Ray
instance that other tests in the session may hold.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_both_modes_are_timed_and_every_trace_arrives_whole(tmp_path):
    out = tmp_path / "tracing.json"
    command = [sys.executable, "-m", "benchmarks.tracing", "--requests", "12", "--rounds", "2",
               "--clients", "2", "--out", str(out)]  # fmt: skip
    subprocess.run(command, cwd=ROOT, check=True, timeout=300)
    results = json.loads(out.read_text())
    modes = results["modes"]
    assert modes["off"]["requests"] == modes["on"]["requests"] == 24
    for mode in modes.values():
        assert 0 < mode["p50_s"] <= mode["p99_s"] < 60
    per_round = results["p50_on_vs_off_by_round"]
    assert len(per_round) == 2 and all(math.isfinite(r) and r > 0 for r in per_round)
    assert min(per_round) <= results["p50_on_vs_off_median_round"] <= max(per_round)
    sent = modes["on"]["requests_sent"]
    assert sent == 24 + 2 * 8  # the timed requests and each round's warm-up
    assert modes["on"]["traces_received"] == sent
    assert modes["on"]["traces_router_and_worker"] == sent
