"""The chaos suite, briefly: a real `manta serve` (two workers, a real Redis) through a worker
SIGKILL mid-stream, Redis killed and frozen, 10x overload, fuzzed requests and a short soak.
The same scenarios as `python -m benchmarks.chaos`, with durations of seconds; what is asserted
is what must hold at any length (nothing lost, altered or 5xx; only 200 and 429 under
overload; every pool whole), not the timings, which the full run reports."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.chaos import Durations, run_chaos


@pytest.fixture(scope="module")
def chaos(tiny_model, tmp_path_factory) -> dict[str, dict]:
    log = tmp_path_factory.mktemp("chaos") / "server.log"
    # The overload's server runs the learned batching policy: its refusals are the same 429s.
    results = run_chaos(
        Path(tiny_model), Durations.quick(), log_path=log, overload_batching="learned"
    )
    assert results["processes_left_after_stop"] == 0  # the clean shutdown stopped everything
    return {row["name"]: row for row in results["scenarios"]}


def test_a_worker_killed_mid_stream_costs_no_request(chaos):
    row = chaos["worker_kill"]
    assert row["sent"] > 100 and row["failed"] == {} and row["altered"] == 0
    assert row["migrated_mid_stream"] + row["retried_before_first_token"] >= 1
    assert row["recovery_s"] == row["recovery_s"]  # not NaN: a replacement came back


@pytest.mark.parametrize("fault", ["redis_kill", "redis_freeze"])
def test_redis_faults_cost_no_request_and_hide_no_worker(chaos, fault):
    row = chaos[fault]
    assert row["sent"] > 100 and row["failed"] == {}
    assert row["workers_in_metrics_during"] == 2
    assert row["recovery_s"] == row["recovery_s"]  # the index holds blocks again


def test_overload_is_shed_with_429_and_drains(chaos):
    row = chaos["overload"]
    assert "--batching learned" in row["server_flags"]
    assert row["other_statuses"] == [] and row["shed_429"] > 0
    assert row["429_with_retry_after"] == row["shed_429"]
    assert row["completed"] > 0 and row["drained"]


def test_fuzzed_requests_get_no_5xx_and_no_reset(chaos):
    row = chaos["fuzz"]
    assert row["sent"] >= 390
    assert row["failed"] == {"http_5xx": 0, "connection": 0}
    assert row["pool_whole"]


def test_a_soak_loses_nothing_and_leaves_the_pools_whole(chaos):
    row = chaos["soak"]
    assert row["sent"] > 100 and row["failed"] == {} and row["pool_whole"]
    assert any("MantaWorker" in name for name in row["rss_growth_after_warmup"])
