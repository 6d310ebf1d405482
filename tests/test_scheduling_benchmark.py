"""The scheduling benchmark's command line, which other tools rely on: one trace, one policy,
simulated or on the real engine, the contract's keys in the JSON it writes; and the suite's
sim-only run with its table, plots and the learned policy's decision time."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks.scheduling import CONTRACT_KEYS, main
from benchmarks.traces import generate
from kvstore.trace import write_trace
from workers.step_cost import DEFAULT_STEP_COST_PATH


@pytest.fixture
def trace_file(tmp_path):
    trace = generate("bursty", 6.0, 12.0, seed=4, prompt_tokens=64, output_tokens=8,
                     max_prompt_tokens=256, max_output_tokens=24)  # fmt: skip
    write_trace(tmp_path / "t.jsonl", trace)
    return tmp_path / "t.jsonl", len(trace)


@pytest.mark.parametrize("engine", ["sim", "real"])
def test_one_replay_writes_the_contract(tmp_path, trace_file, tiny_model, engine):
    path, num_requests = trace_file
    out = tmp_path / "out.json"
    argv = ["--trace", str(path), "--policy", "learned", "--engine", engine, "--model",
            tiny_model, "--slo-ttft", "0.5", "--slo-itl", "0.05", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert set(CONTRACT_KEYS) <= set(result)
    assert (result["policy"], result["engine"]) == ("learned", engine)
    assert result["requests"] == num_requests
    assert result["completed"] + result["rejected"] == num_requests
    for key in CONTRACT_KEYS[2:]:
        assert math.isfinite(result[key]) and result[key] >= 0, key
    assert result["throughput_tok_s"] > 0


def test_the_sim_suite_compares_every_policy_on_every_family(tmp_path, capsys):
    out = tmp_path / "suite.json"
    argv = ["--sim-only", "--duration", "8", "--rate", "10", "--json", str(out)]
    assert main(argv) == 0
    results = json.loads(out.read_text())
    runs = {(r["trace"], r["policy"]) for r in results["runs"]}
    families = ("poisson", "diurnal", "bursty", "heavy_tailed", "shared_prefix")
    assert runs == {(f, p) for f in families for p in ("fixed", "adaptive", "learned")}
    assert 0 < results["learned_decision_us"] < 1e4
    assert all(r["gflops"] > 0 for r in results["runs"])  # the machine's speed beside each run
    assert (tmp_path / "scheduling-bursty-sim.png").stat().st_size > 1000
    assert "learned/fixed goodput" in capsys.readouterr().out


def test_simulator_error_is_against_the_mean_of_the_real_replays_with_their_spread():
    from benchmarks.scheduling import SIM_AT_PROBE_SPEED, SIM_AT_REPLAY_SPEED, simulator_error

    def run(engine, policy, e2e, ttft, repeat=0):
        return {"trace": "bursty", "engine": engine, "policy": policy, "repeat": repeat,
                "e2e_mean_s": e2e, "ttft_p99_s": ttft}  # fmt: skip

    runs = []
    for policy in ("fixed", "adaptive", "learned"):
        runs += [run("sim", policy, 2.2, 1.0), run("real", policy, 1.8, 1.0),
                 run("real", policy, 2.2, 1.5, repeat=1),
                 run(SIM_AT_PROBE_SPEED, policy, 2.1, 1.25),
                 run(SIM_AT_REPLAY_SPEED, policy, 1.9, 1.2),
                 run(SIM_AT_REPLAY_SPEED, policy, 2.1, 1.3, repeat=1)]  # fmt: skip
    errors = simulator_error(runs, "bursty")
    assert [e["policy"] for e in errors] == ["fixed", "adaptive", "learned"]
    first = errors[0]
    assert first["real_replays"] == 2
    assert first["e2e_mean_error"] == pytest.approx(0.2 / 2.0)
    assert first["ttft_p99_error"] == pytest.approx(0.25 / 1.25)
    assert first["e2e_mean_real_spread"] == pytest.approx(0.4 / 2.0)
    assert first["ttft_p99_real_spread"] == pytest.approx(0.5 / 1.25)
    # The simulator rerun at each replay's speed, judged the same way: the mean of its runs.
    assert first["e2e_mean_error_at_probe_speed"] == pytest.approx(0.1 / 2.0)
    assert first["ttft_p99_error_at_probe_speed"] == pytest.approx(0.0)
    assert first["e2e_mean_error_at_replay_speed"] == pytest.approx(0.0)
    assert first["ttft_p99_error_at_replay_speed"] == pytest.approx(0.0)
    without = simulator_error([r for r in runs if r["engine"] != SIM_AT_PROBE_SPEED], "bursty")
    assert "e2e_mean_error_at_probe_speed" not in without[0]
    assert "e2e_mean_error_at_replay_speed" in without[0]


def test_scaled_sims_run_each_replay_at_its_own_speeds(tiny_model):
    from argparse import Namespace

    from benchmarks.scheduling import SIM_AT_PROBE_SPEED, SIM_AT_REPLAY_SPEED, scaled_sims
    from workers.simulator import SimSettings
    from workers.step_cost import BucketedStepCost

    trace = generate("bursty", 6.0, 12.0, seed=4, prompt_tokens=64, output_tokens=8,
                     max_prompt_tokens=256, max_output_tokens=24)  # fmt: skip
    cost = BucketedStepCost.load(DEFAULT_STEP_COST_PATH)
    real = {"trace": "bursty", "policy": "fixed", "repeat": 1,
            "probe_speed_decode": 1.0, "probe_speed_prefill": 1.0,
            "replay_speed_decode": 3.0, "replay_speed_prefill": 2.0}  # fmt: skip
    args = Namespace(model=tiny_model, learned=None)
    probe, own = scaled_sims([real], trace, SimSettings(), cost, args)
    assert (probe["engine"], own["engine"]) == (SIM_AT_PROBE_SPEED, SIM_AT_REPLAY_SPEED)
    assert {probe["repeat"], own["repeat"], probe["policy"]} == {1, "fixed"}
    assert (own["replay_speed_decode"], own["replay_speed_prefill"]) == (3.0, 2.0)
    # The same trace on a machine two to three times slower: every request takes longer.
    assert own["e2e_mean_s"] > 1.8 * probe["e2e_mean_s"]
    assert own["requests"] == probe["requests"] == len(trace)
