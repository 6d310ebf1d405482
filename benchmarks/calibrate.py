"""Fits the simulator's step-cost model to the steps this machine's engine measures.

`manta bench calibrate [--model DIR] [--out benchmarks/results/step_cost.json]`

Runs the real engine through steps of every shape the scheduler makes (prefill chunks of
several sizes, decode batches of several sizes and context lengths, and both mixed), then
through short replays of generated traffic under each batching policy (the mix of steps that
serving makes), records what each step computed and how long it took, and fits
t = a + b prefill + c decode + d context + e sequences (workers/step_cost.py), plus the
residual it leaves per step kind and batch-size bucket, on every other step; the steps left
out measure the fit's error, with and without the residual tables. The JSON it writes is what
`python -m benchmarks.scheduling --engine sim --step-cost FILE` and `manta train-scheduler`
read.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from benchmarks.common import checkpoint, machine, print_table
from benchmarks.scheduling import LENGTHS
from benchmarks.traces import generate
from kvstore.sampling_params import SamplingParams
from workers import Engine, EngineConfig
from workers.replay import WallClock, replay
from workers.step_cost import BucketedStepCost, StepCost, StepFeatures, speed_factors

# (requests added at once, prompt tokens each, tokens generated each)
SHAPES = [
    (1, 32, 16), (1, 512, 8), (1, 1500, 4), (4, 128, 32), (8, 256, 32), (16, 64, 48),
    (32, 128, 48), (48, 32, 64), (64, 256, 24), (24, 700, 16),
]  # fmt: skip


def run_steps(
    engine: Engine, vocab_size: int, seed: int = 0, shapes: list[tuple[int, int, int]] = SHAPES
) -> list[tuple[StepFeatures, float]]:
    """Every step of every shape, plus each shape joined mid-decode by a second wave (prefill
    chunks beside running decodes)."""
    rng = np.random.default_rng(seed)
    steps: list[tuple[StepFeatures, float]] = []

    def add(count: int, prompt: int, output: int) -> None:
        params = SamplingParams(max_tokens=output, temperature=0.0, ignore_eos=True)
        for _ in range(count):
            engine.add_request(rng.integers(0, vocab_size, prompt).tolist(), params)

    def drain(joiner: tuple[int, int, int] | None = None) -> None:
        step = 0
        while engine.has_unfinished():
            started = time.perf_counter()
            engine.step()
            if engine.last_step is not None:
                steps.append((engine.last_step[0], time.perf_counter() - started))
            step += 1
            if joiner is not None and step == 6:
                add(*joiner)

    for count, prompt, output in shapes:
        add(count, prompt, output)
        drain()
    for (count, prompt, output), joiner in zip(shapes, reversed(shapes)):
        add(count, prompt, output)
        drain(joiner)
    return steps


# A few seconds of steps across the batch sizes: the machine's speed of the moment.
PROBE_SHAPES = [(1, 192, 12), (8, 192, 16), (32, 160, 12), (64, 128, 8)]


def probe_speed(model: str, cost: StepCost, seed: int = 0) -> tuple[float, float]:
    """How much slower (> 1) or faster than `cost` predicts this machine runs decode-only
    steps and steps with prefill now, from the steps of `PROBE_SHAPES` on a fresh engine."""
    engine = Engine(EngineConfig(model=model, kv_cache_bytes=256 * 2**20, seed=seed))
    vocab = engine.model_config.vocab_size
    run_steps(engine, vocab, seed, PROBE_SHAPES[:2])  # warm-up: one-off costs of first steps
    steps = run_steps(engine, vocab, seed + 1, PROBE_SHAPES)
    if engine.kv.num_free_blocks != engine.kv.pool.num_blocks:  # every request ended: all freed
        raise RuntimeError("the speed probe left KV blocks held: the pool is not whole")
    return speed_factors(cost, steps)


# (trace family, batching policy): a few seconds of serving-like steps each.
REPLAYS = [("poisson", "fixed"), ("shared_prefix", "adaptive"), ("bursty", "learned")]


def replay_steps(model: str, duration_s: float, seed: int) -> list[tuple[StepFeatures, float]]:
    steps: list[tuple[StepFeatures, float]] = []
    for family, policy in REPLAYS:
        engine = Engine(EngineConfig(model=model, kv_cache_bytes=256 * 2**20, batching=policy))
        engine.scheduler.policy.set_targets(1.0, 0.025)
        trace = generate(family, duration_s, 16.0, seed, **LENGTHS)
        steps += replay(trace, engine, WallClock(), engine.model_config.vocab_size).steps
    return steps


def calibrate(model: str, threads: int | None, seed: int = 0, replay_s: float = 12.0) -> dict:
    if threads:
        torch.set_num_threads(threads)
    engine = Engine(EngineConfig(model=model, kv_cache_bytes=256 * 2**20, seed=seed))
    vocab = engine.model_config.vocab_size
    run_steps(engine, vocab, seed)  # warm-up: first steps of each shape pay one-off costs
    started = time.perf_counter()
    steps = run_steps(engine, vocab, seed + 1) + replay_steps(model, replay_s, seed)
    fit_steps, held_out = steps[::2], steps[1::2]
    # On seconds, not relative error: the simulator sums step times into latencies.
    cost = BucketedStepCost.fit([f for f, _ in fit_steps], [s for _, s in fit_steps])
    features, seconds = [f for f, _ in held_out], [s for _, s in held_out]
    measured = sum(seconds)
    sum_error = abs(sum(cost.seconds(f) for f in features) - measured) / measured
    return {
        "model": model,
        "step_cost": cost,
        "steps": len(steps),
        "seconds": time.perf_counter() - started,
        "held_out_relative_error": cost.relative_error(features, seconds),
        "held_out_relative_error_linear": cost.linear.relative_error(features, seconds),
        "held_out_total_error": sum_error,
        "machine": machine(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="manta bench calibrate", description=__doc__)
    parser.add_argument("--model", help="checkpoint directory (default: the small preset)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's setting)")
    parser.add_argument("--out", default="benchmarks/results/step_cost.json")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    model = args.model or str(checkpoint("small"))
    result = calibrate(model, args.threads, args.seed)
    cost: BucketedStepCost = result.pop("step_cost")
    line = cost.linear
    rows = [[name, f"{getattr(line, name):.3g}"] for name in line.__dataclass_fields__]
    rows += [[f"{kind} residual, batch bucket {b}", f"{r:.3g}"]
             for kind, table in (("decode", cost.decode_residuals),
                                 ("prefill", cost.prefill_residuals))
             for b, r in enumerate(table)]  # fmt: skip
    load = result["machine"]["load_average_1m"]
    print_table(
        f"step cost on {result['steps']} steps of {model} (held-out error "
        f"{result['held_out_relative_error']:.1%} per step, the line alone "
        f"{result['held_out_relative_error_linear']:.1%}; {result['held_out_total_error']:.1%} "
        f"in total; load {load:.2f})",
        ["coefficient", "seconds per unit"],
        rows,
    )
    cost.save(args.out, **result)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
