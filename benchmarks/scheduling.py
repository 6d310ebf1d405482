"""Batching policies on the same traces: fixed (the usual engine constants), adaptive, learned.

One replay (the command line other tools rely on):
    python -m benchmarks.scheduling --trace FILE.jsonl --policy fixed|adaptive|learned
        --engine real|sim --model DIR --slo-ttft S --slo-itl S --json OUT.json
The suite (no --trace): every trace family in the simulator and the bursty and shared-prefix
traces on the real engine too, every policy on the same trace in the same run. It prints a
table per engine, the simulator's error against the real engine and the learned policy's
decision time, and draws a PNG per trace of queue depth, batch size and p99 TTFT over time.

`fixed` queues every request, as an engine without admission does; `adaptive` and `learned`
admit by the SLOs, as a worker serving with them does. Goodput: requests per second of the
trace that met both SLOs (time to first token, and mean time per output token after it).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np

from benchmarks.common import checkpoint, fmt, machine, matmul_gflops, print_table, write_json
from benchmarks.traces import generate
from kvstore.sampling_params import SamplingParams
from kvstore.trace import TraceRequest, read_trace, write_trace
from workers.batching_policy import QueueSnapshot, StepTimeModel
from workers.policy_factory import POLICIES, make_batching_policy
from workers.replay import ReplayResult, WallClock, replay, summarize
from workers.request import Request
from workers.simulator import SimSettings, admission_for, simulate
from workers.step_cost import (
    DEFAULT_STEP_COST_PATH,
    BucketedStepCost,
    ScaledStepCost,
    StepCost,
    speed_factors,
)

CONTRACT_KEYS = (
    "policy", "engine", "requests", "completed", "rejected", "goodput_rps",
    "throughput_tok_s", "ttft_p50_s", "ttft_p99_s", "itl_p99_s", "e2e_p99_s",
)  # fmt: skip
FAMILIES = ("poisson", "diurnal", "bursty", "heavy_tailed", "shared_prefix")
REAL_FAMILIES = ("bursty", "shared_prefix")
# The simulator rerun once per real replay, its step cost carried to that replay's speed:
# as a probe measured it just before (a forecast), or as the replay's own steps measured it.
SIM_AT_PROBE_SPEED = "sim_at_probe_speed"
SIM_AT_REPLAY_SPEED = "sim_at_replay_speed"
SPEEDS = {SIM_AT_PROBE_SPEED: "probe_speed", SIM_AT_REPLAY_SPEED: "replay_speed"}
# Sized for the small preset on two CPU cores: a few hundred tokens a prompt.
LENGTHS = dict(prompt_tokens=192, output_tokens=48, max_prompt_tokens=1024, max_output_tokens=192)


def run_once(
    trace: list[TraceRequest],
    policy: str,
    engine: str,
    settings: SimSettings,
    cost: StepCost,
    model: str,
    learned: str | None = None,
) -> tuple[dict, ReplayResult]:
    """One policy on one trace, simulated or on the real engine (in this process, on the
    wall clock); its summary and its replay."""
    if engine == "sim":
        result = simulate(trace, policy, cost, settings, learned=learned)
    else:
        from workers import Engine, EngineConfig

        real = Engine(
            EngineConfig(
                model=model,
                num_blocks=settings.num_blocks,
                block_size=settings.block_size,
                max_num_seqs=settings.max_num_seqs,
                max_num_batched_tokens=settings.max_num_batched_tokens,
                batching=policy,
                learned_policy=learned,
            )
        )
        real.scheduler.policy.set_targets(settings.slo_ttft_s, settings.slo_itl_s)
        admission = admission_for(policy, settings, real.step_time)
        vocab = real.model_config.vocab_size
        result = replay(trace, real, WallClock(), vocab, admission)
        if real.kv.num_free_blocks != settings.num_blocks:  # every request ended: all freed
            raise RuntimeError(f"{policy} replay left KV blocks held: the pool is not whole")
    summary = summarize(result, settings.slo_ttft_s, settings.slo_itl_s)
    return {"policy": policy, "engine": engine, **summary}, result


def decision_time_us(learned: str | None, steps: int = 20000) -> float:
    """Mean microseconds the learned policy spends a step: its limits and one queue key."""
    policy = make_batching_policy("learned", 2048, 64, StepTimeModel(), learned=learned)
    request = Request("r", list(range(200)), SamplingParams(max_tokens=64), 0.0)
    started = time.perf_counter()
    for i in range(steps):
        snapshot = QueueSnapshot(32, 8, 1600, 500, now=i * 0.01, num_arrivals=i)
        policy.limits(snapshot)
        policy.waiting_key(request)
    return (time.perf_counter() - started) / steps * 1e6


def rolling_p99_ttft(result: ReplayResult, window_s: float = 2.0) -> tuple[list, list]:
    """p99 TTFT of the requests whose first token came in the last `window_s`, every 0.5 s."""
    points = sorted((r.first_token_s, r.ttft_s) for r in result.records if r.ttft_s is not None)
    if not points:
        return [], []
    ends = np.arange(window_s / 2, points[-1][0] + 0.5, 0.5)
    p99 = [np.percentile([y for x, y in points if e - window_s < x <= e] or [0], 99) for e in ends]
    return list(ends), p99


def plot(path: Path, title: str, results: dict[str, ReplayResult], slo_ttft_s: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    for name, result in results.items():
        t = [p.t for p in result.timeline]
        axes[0].plot(t, [p.num_waiting for p in result.timeline], label=name, lw=0.8)
        axes[1].plot(t, [p.batch_seqs for p in result.timeline], label=name, lw=0.8)
        axes[2].plot(*rolling_p99_ttft(result), label=name, lw=0.8)
    axes[2].axhline(slo_ttft_s, color="grey", ls=":", lw=0.8)
    for ax, label in zip(axes, ("queue depth", "batch (sequences)", "p99 TTFT, 2 s window (s)")):
        ax.set_ylabel(label)
    axes[0].set_title(title)
    axes[0].legend()
    axes[2].set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def simulator_error(runs: list[dict], family: str) -> list[dict]:
    """|sim - real| / real for mean end-to-end latency and p99 TTFT, per policy, `real` being
    the mean over the repeated real replays; beside it their own spread, (max - min) / mean:
    the real engine's run-to-run noise, below which no simulator can be judged. The same for
    each kind of scaled simulator run present, the mean over its runs (one per replay)."""
    errors = []
    for policy in POLICIES:
        mine = [r for r in runs if r["trace"] == family and r["policy"] == policy]
        (sim,) = [r for r in mine if r["engine"] == "sim"]
        reals = [r for r in mine if r["engine"] == "real"]
        row = {"trace": family, "policy": policy, "real_replays": len(reals)}
        for key, name in (("e2e_mean_s", "e2e_mean"), ("ttft_p99_s", "ttft_p99")):
            values = [r[key] for r in reals]
            mean = float(np.mean(values))
            row[f"{name}_error"] = abs(sim[key] - mean) / mean
            row[f"{name}_real_spread"] = (max(values) - min(values)) / mean
            for engine, speed in SPEEDS.items():
                if scaled := [r[key] for r in mine if r["engine"] == engine]:
                    row[f"{name}_error_at_{speed}"] = abs(float(np.mean(scaled)) - mean) / mean
        errors.append(row)
    return errors


def scaled_sims(
    reals: list[dict], trace: list[TraceRequest], settings: SimSettings, cost: StepCost, args
) -> list[dict]:
    """The simulator again for each real replay, at the speed its probe measured and at the
    speed its own steps ran (decode-only steps and steps with prefill each by their factor)."""
    runs = []
    for real in reals:
        for engine, speed in SPEEDS.items():
            decode, prefill = real[f"{speed}_decode"], real[f"{speed}_prefill"]
            scaled = ScaledStepCost(cost, decode, prefill)
            summary, _ = run_once(trace, real["policy"], "sim", settings, scaled, args.model,
                                  args.learned)  # fmt: skip
            runs.append({"trace": real["trace"], "repeat": real["repeat"], "gflops": 0.0,
                         **summary, "engine": engine, f"{speed}_decode": decode,
                         f"{speed}_prefill": prefill})  # fmt: skip
    return runs


def suite(args: argparse.Namespace, settings: SimSettings, cost: StepCost) -> dict:
    from benchmarks.calibrate import probe_speed  # it imports this module

    out_dir = Path(args.json).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    runs, errors = [], []
    for family in FAMILIES:
        trace = generate(family, args.duration, args.rate, args.seed, **LENGTHS)
        write_trace(out_dir / f"trace-{family}.jsonl", trace)
        engines = ("sim", "real") if family in REAL_FAMILIES and not args.sim_only else ("sim",)
        for engine in engines:
            for repeat in range(args.real_repeats if engine == "real" else 1):
                results = {}
                for policy in POLICIES:
                    speed = {"gflops": matmul_gflops()}
                    if engine == "real":  # how far the machine has drifted from `cost`
                        speed["probe_speed_decode"], speed["probe_speed_prefill"] = probe_speed(
                            args.model, cost
                        )
                    summary, results[policy] = run_once(
                        trace, policy, engine, settings, cost, args.model, args.learned
                    )
                    if engine == "real":  # and how far it was, over the replay's own steps
                        own = speed_factors(cost, results[policy].steps)
                        speed["replay_speed_decode"], speed["replay_speed_prefill"] = own
                    runs.append({"trace": family, "repeat": repeat, **speed, **summary})
                    good = summary["goodput_rps"]
                    print(f"{family} {engine} {policy}: {good:.2f} good/s", flush=True)
                if repeat == 0:
                    title = f"{family} trace, {engine} engine"
                    path = out_dir / f"scheduling-{family}-{engine}.png"
                    plot(path, title, results, settings.slo_ttft_s)
        if "real" in engines:
            reals = [r for r in runs if r["trace"] == family and r["engine"] == "real"]
            runs += scaled_sims(reals, trace, settings, cost, args)
            errors += simulator_error(runs, family)
    return {
        "settings": {k: v for k, v in vars(args).items() if k != "func"},
        "slo": {"ttft_s": settings.slo_ttft_s, "itl_s": settings.slo_itl_s},
        "step_cost": dataclasses.asdict(cost),
        "runs": runs,
        "simulator_error": errors,
        "learned_decision_us": decision_time_us(args.learned),
        "machine": machine(),
    }


def report(results: dict) -> None:
    runs = results["runs"]
    for engine in ("sim", "real"):
        rows = [
            [
                r["trace"], r["policy"], fmt(r["goodput_rps"]), fmt(r["throughput_tok_s"]),
                fmt(r["ttft_p50_s"]), fmt(r["ttft_p99_s"]), fmt(r["itl_p99_s"]),
                fmt(r["e2e_p99_s"]), str(r["rejected"]), fmt(r["cpu_s_per_mtok"]),
                f"{r['gflops']:.0f}",
            ]
            for r in runs
            if r["engine"] == engine
        ]  # fmt: skip
        if rows:
            header = ["trace", "policy", "goodput/s", "tok/s", "TTFT p50", "TTFT p99", "ITL p99"]
            header += ["e2e p99", "rejected", "CPU-s/Mtok", "GFLOP/s before"]
            print_table(f"{engine} engine", header, rows)
        replays = sorted({(r["trace"], r["repeat"]) for r in runs if r["engine"] == engine})
        for family, repeat in replays:
            key = (engine, family, repeat)
            by = {r["policy"]: r for r in runs if (r["engine"], r["trace"], r["repeat"]) == key}
            fixed, adaptive, learned = by["fixed"], by["adaptive"], by["learned"]
            which = f" (replay {repeat + 1})" if engine == "real" else ""
            print(
                f"{engine} {family}{which}: learned/fixed goodput "
                f"{ratio(learned['goodput_rps'], fixed['goodput_rps'])}, p99 TTFT "
                f"{ratio(learned['ttft_p99_s'], fixed['ttft_p99_s'])}; learned/adaptive goodput "
                f"{ratio(learned['goodput_rps'], adaptive['goodput_rps'])}"
            )
    for e in results["simulator_error"]:
        print(
            f"simulator error, {e['trace']} {e['policy']}: mean e2e {e['e2e_mean_error']:.1%}, "
            f"p99 TTFT {e['ttft_p99_error']:.1%} (against the mean of {e['real_replays']} real "
            f"replays, which differ among themselves by {e['e2e_mean_real_spread']:.1%} and "
            f"{e['ttft_p99_real_spread']:.1%})"
        )
        for speed, how in (("probe_speed", "probed before each replay"),
                           ("replay_speed", "measured in each replay's own steps")):  # fmt: skip
            if f"e2e_mean_error_at_{speed}" in e:
                print(
                    f"  at the speed {how}: mean e2e {e[f'e2e_mean_error_at_{speed}']:.1%}, "
                    f"p99 TTFT {e[f'ttft_p99_error_at_{speed}']:.1%}"
                )
    for r in runs:
        if r["engine"] == "real":
            print(
                f"{r['trace']} {r['policy']} replay {r['repeat'] + 1}: decode and prefill steps "
                f"ran {r['probe_speed_decode']:.2f}x and {r['probe_speed_prefill']:.2f}x the "
                f"calibration in the probe before, {r['replay_speed_decode']:.2f}x and "
                f"{r['replay_speed_prefill']:.2f}x in the replay"
            )
    print(f"learned policy decision time: {results['learned_decision_us']:.1f} us per step")
    print(f"load average (1 min) at the end: {results['machine']['load_average_1m']:.2f}")


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "inf"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scheduling", description=__doc__)
    p.add_argument("--trace", help="replay this JSONL trace once (else: the suite)")
    p.add_argument("--policy", choices=POLICIES, default="learned")
    p.add_argument("--engine", choices=("real", "sim"), default="sim")
    p.add_argument("--model", help="checkpoint directory (default: the small preset)")
    p.add_argument("--step-cost", help="the simulator's step cost (manta bench calibrate)")
    p.add_argument(
        "--calibrate",
        action="store_true",
        help="fit the step cost on this machine first, in this run (about 2 minutes): the "
        "machine's speed drifts, and the simulator's error is then judged at today's",
    )
    p.add_argument("--learned", help="learned policy parameters (default: the shipped ones)")
    p.add_argument("--slo-ttft", type=float, default=1.0, help="seconds to first token")
    p.add_argument("--slo-itl", type=float, default=0.025, help="mean seconds per output token")
    p.add_argument("--duration", type=float, default=60.0, help="suite: seconds per trace")
    p.add_argument("--rate", type=float, default=16.0, help="suite: mean requests per second")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sim-only", action="store_true", help="suite: no real-engine replays")
    p.add_argument(
        "--real-repeats", type=int, default=2, help="suite: real replays of each trace and policy"
    )
    p.add_argument("--json", default="benchmarks/results/scheduling.json")
    args = p.parse_args(argv)
    args.model = args.model or str(checkpoint("small"))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.calibrate:
        from benchmarks.calibrate import calibrate

        before = matmul_gflops()
        calibration = calibrate(args.model, threads=None)
        cost = calibration["step_cost"]
        print(f"calibrated at {before:.0f}-{matmul_gflops():.0f} GFLOP/s: held-out error "
              f"{calibration['held_out_relative_error']:.1%} a step")  # fmt: skip
    else:
        cost = BucketedStepCost.load(args.step_cost or DEFAULT_STEP_COST_PATH)
    settings = SimSettings(slo_ttft_s=args.slo_ttft, slo_itl_s=args.slo_itl)
    if args.trace:
        trace = read_trace(args.trace)
        summary, _ = run_once(
            trace, args.policy, args.engine, settings, cost, args.model, args.learned
        )
        write_json(args.json, summary)  # the contract's keys, and the rest of the summary
        print({k: summary[k] for k in CONTRACT_KEYS})
        return 0
    results = suite(args, settings, cost)
    report(results)
    print(f"\nwrote {write_json(args.json, results)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
