"""Speculative decoding: tokens/s with it off, with a fixed k and with "auto", side by side.

Draft/target pairs come from `make_draft_pair` at three agreement levels (upper-layer scales
calibrated once per preset so that the measured greedy acceptance lands near 0.5, 0.7 and 0.9;
the table reports the measured rates). Each level sends concurrent greedy requests (batch 1, 8
and 64, all submitted at once, fixed output length) to three long-lived engines over the same
target (off, fixed k, auto), interleaved and repeated with fresh prompts; the best repeat
counts. Every speculative run must emit exactly the tokens of the run without speculation.

The n-gram proposer runs on a workload whose continuation re-occurs in its prompt. Random weights
cannot be made to quote, so the prompt is built from the target's own text: a random opening
followed by the target's greedy continuation of it (a passage of `passage_len` tokens); the
request then continues that continuation. Its tokens re-occur in the prompt exactly where the
target repeats itself, which random targets often do (short loops; for `small` the n-gram target
is drawn with a smaller `initializer_range` than the pairs, which loops more). The acceptance
reported is what this gives, not a chosen number.

    python -m benchmarks.spec_decode [--preset small] [--quick] [--threads N] [--out PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import fmt, machine, print_table, random_ids, run_benchmark
from workers import LLM, SamplingParams
from workers.model.draft_pair import make_draft_pair
from workers.model.make_model import make_model

MODES = ("off", "fixed", "auto")
BLOCK_SIZE = 16
COUNTERS = ("spec_decode_steps", "spec_decode_proposed_tokens", "spec_decode_accepted_tokens")
SHARED_LOAD = 0.5  # a load average above this before the run means other work shares the CPUs


@dataclasses.dataclass(frozen=True, slots=True)
class Calibration:
    """How a preset's checkpoints are built: upper-layer scale per nominal acceptance level."""

    draft_layers: int
    initializer_range: float  # the pairs: peaked weights, so greedy choices are never ties
    scales: dict[float, float]
    ngram_initializer_range: float  # the n-gram target: flatter weights, which loop more


# Calibrated once per preset on short runs of this benchmark's workload (k = 4).
CALIBRATION = {
    "tiny": Calibration(1, 0.1, {0.5: 0.15, 0.7: 0.07, 0.9: 0.012}, 0.1),
    "small": Calibration(1, 0.1, {0.5: 0.055, 0.7: 0.03, 0.9: 0.007}, 0.035),
}


@dataclasses.dataclass(slots=True)
class Settings:
    """Sizes of one run; ``--quick`` shortens it to a smoke test."""

    preset: str = "small"
    batches: tuple[int, ...] = (1, 8, 64)
    ngram_batches: tuple[int, ...] = (1, 8)
    prompt_len: int = 32
    output_len: int = 64
    passage_len: int = 96  # the target's own text in each n-gram prompt
    fixed_k: int = 4
    repeats: int = 3
    seed: int = 0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        if args.quick:
            return cls(args.preset, output_len=16, passage_len=48, repeats=1, seed=args.seed)
        return cls(args.preset, seed=args.seed)


@dataclasses.dataclass(slots=True)
class Run:
    """One batch of requests through one engine, submitted together and run to the end."""

    outputs: list[list[int]]
    wall_s: float
    cpu_s: float
    latency_s: list[float]
    request_steps: int  # (request, step) pairs that emitted tokens
    counters: dict[str, float]


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def run_batch(llm: LLM, prompts: Sequence[list[int]], max_tokens: int) -> Run:
    """Submit every prompt at once and step to the end; latency is from submission."""
    engine = llm.engine
    before = engine.stats()
    start, cpu_start = time.perf_counter(), time.process_time()
    index = {engine.add_request(p, greedy(max_tokens)).request_id: i for i, p in enumerate(prompts)}
    outputs: list[list[int]] = [[] for _ in prompts]
    latency = [math.nan] * len(prompts)
    request_steps = 0
    while engine.has_unfinished():
        for delta in engine.step():
            i = index[delta.request_id]
            outputs[i].extend(delta.new_token_ids)
            request_steps += 1
            if delta.finished:
                latency[i] = time.perf_counter() - start
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    after = engine.stats()
    counters = {key: after.get(key, 0) - before.get(key, 0) for key in COUNTERS}
    return Run(outputs, wall, cpu, latency, request_steps, counters)


def summarize(runs: list[Run], reference: list[Run]) -> dict[str, float]:
    """The best repeat's speed; acceptance and k over all repeats; mismatches against off."""
    best = min(runs, key=lambda r: r.wall_s)
    tokens = sum(len(out) for out in best.outputs)
    total = {key: sum(r.counters[key] for r in runs) for key in COUNTERS}
    proposed, accepted = total["spec_decode_proposed_tokens"], total["spec_decode_accepted_tokens"]
    request_steps = sum(r.request_steps for r in runs)
    return {
        "tokens_per_s": tokens / best.wall_s,
        "cpu_tokens_per_s": tokens / best.cpu_s,
        "mean_latency_s": sum(best.latency_s) / len(best.latency_s),
        "output_tokens": tokens,
        "mismatches": sum(
            out != ref
            for run, base in zip(runs, reference)
            for out, ref in zip(run.outputs, base.outputs)
        ),
        "proposed_tokens": proposed,
        "accepted_tokens": accepted,
        "acceptance_rate": accepted / proposed if proposed else 0.0,
        # Per speculated (request, step), as `spec_decode_mean_accepted_length` counts it.
        "mean_accepted_length": accepted / total["spec_decode_steps"] if proposed else 0.0,
        # Per (request, step), counting the steps that did not speculate as k = 0.
        "mean_k": proposed / request_steps,
        "tokens_per_request_step": sum(len(o) for r in runs for o in r.outputs) / request_steps,
    }


def compare(
    engines: dict[str, LLM], prompt_sets: list[list[list[int]]], max_tokens: int
) -> dict[str, dict[str, float]]:
    """Every mode over the same prompt sets (one per repeat), interleaved so load hits all."""
    runs: dict[str, list[Run]] = {mode: [] for mode in engines}
    for prompts in prompt_sets:
        for mode, llm in engines.items():
            runs[mode].append(run_batch(llm, prompts, max_tokens))
    results = {mode: summarize(mode_runs, runs["off"]) for mode, mode_runs in runs.items()}
    for mode in MODES[1:]:
        for key in ("tokens_per_s", "cpu_tokens_per_s"):
            results[mode][f"{key}_ratio"] = results[mode][key] / results["off"][key]
    return results


def make_engines(
    target: Path, speculative: dict, settings: Settings, num_blocks: int
) -> dict[str, LLM]:
    """Speculation off, fixed k and auto over one target, each warmed up on a short batch."""
    ks = {"off": None, "fixed": settings.fixed_k, "auto": "auto"}
    engines = {}
    for mode, k in ks.items():
        spec = None if k is None else {**speculative, "num_speculative_tokens": k}
        llm = LLM(str(target), speculative=spec, num_blocks=num_blocks)
        llm.generate([[7] * settings.prompt_len, [11] * settings.prompt_len], greedy(8))
        engines[mode] = llm
    return engines


def random_prompts(rng: random.Random, llm: LLM, count: int, settings: Settings) -> list:
    vocab = llm.engine.model_config.vocab_size
    return [random_ids(rng, vocab, settings.prompt_len) for _ in range(count)]


def self_quoting_prompts(rng: random.Random, llm: LLM, count: int, settings: Settings) -> list:
    """A random opening, then the target's own greedy continuation of it."""
    openings = random_prompts(rng, llm, count, settings)
    outs = llm.generate(openings, greedy(settings.passage_len))
    return [o + out.outputs[0].token_ids for o, out in zip(openings, outs)]


def run_rows(
    engines: dict[str, LLM],
    batches: Sequence[int],
    make_prompts: Callable[..., list],
    rng: random.Random,
    settings: Settings,
) -> list[dict[str, Any]]:
    """Every batch size, in increasing order on the same engines; fresh prompts per repeat."""
    rows = []
    for b in batches:
        sets = [make_prompts(rng, engines["off"], b, settings) for _ in range(settings.repeats)]
        rows.append({"batch": b, **compare(engines, sets, settings.output_len)})
    return rows


def pooled_acceptance(rows: list[dict[str, Any]]) -> float:
    proposed = sum(row["fixed"]["proposed_tokens"] for row in rows)
    return sum(row["fixed"]["accepted_tokens"] for row in rows) / proposed if proposed else 0.0


def headline(levels: list[dict[str, Any]], ngram: dict[str, Any]) -> dict[str, float]:
    """The two DESIGN.md targets, by wall time and by CPU time (steadier on a shared machine):
    fixed k at batch 1 with the best draft, and auto at the largest batch and everywhere."""
    best = max(levels, key=lambda level: level["measured_acceptance"])
    batch1 = min(best["rows"], key=lambda row: row["batch"])
    largest = [max(level["rows"], key=lambda row: row["batch"]) for level in levels]
    everywhere = [row for part in [*levels, ngram] for row in part["rows"]]
    out = {}
    for clock, key in (("wall", "tokens_per_s_ratio"), ("cpu", "cpu_tokens_per_s_ratio")):
        out[f"batch1_best_draft_fixed_x_off_{clock}"] = batch1["fixed"][key]
        out[f"batch1_best_draft_auto_x_off_{clock}"] = batch1["auto"][key]
        out[f"largest_batch_auto_min_x_off_{clock}"] = min(row["auto"][key] for row in largest)
        out[f"auto_min_x_off_{clock}"] = min(row["auto"][key] for row in everywhere)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement, as the JSON-ready results."""
    load_before = os.getloadavg()[0]
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = Settings.from_args(args)
    calibration = CALIBRATION[settings.preset]
    rng = random.Random(settings.seed)
    longest = settings.prompt_len + settings.passage_len + settings.output_len
    num_blocks = max(settings.batches) * (longest // BLOCK_SIZE + 2)
    levels = []
    with tempfile.TemporaryDirectory(prefix="manta-spec-") as tmp:
        for nominal, scale in calibration.scales.items():
            target, draft = make_draft_pair(
                Path(tmp, f"pair-{scale}"),
                settings.preset,
                calibration.draft_layers,
                scale,
                seed=settings.seed,
                initializer_range=calibration.initializer_range,
            )
            spec = {"method": "draft", "model": str(draft)}
            engines = make_engines(target, spec, settings, num_blocks)
            rows = run_rows(engines, settings.batches, random_prompts, rng, settings)
            levels.append(
                {
                    "nominal_acceptance": nominal,
                    "upper_scale": scale,
                    "measured_acceptance": pooled_acceptance(rows),
                    "rows": rows,
                }
            )
        looping = make_model(
            Path(tmp, "ngram"),
            settings.preset,
            seed=settings.seed,
            initializer_range=calibration.ngram_initializer_range,
        )
        engines = make_engines(looping, {"method": "ngram"}, settings, num_blocks)
        ngram_rows = run_rows(engines, settings.ngram_batches, self_quoting_prompts, rng, settings)
    ngram = {
        "workload": "self-quoting: random opening + the target's own greedy continuation",
        "measured_acceptance": pooled_acceptance(ngram_rows),
        "rows": ngram_rows,
    }
    rows = [row for part in [*levels, ngram] for row in part["rows"]]
    return {
        "benchmark": "spec_decode",
        "settings": dataclasses.asdict(settings),
        "calibration": dataclasses.asdict(calibration),
        "machine": {
            **machine(),
            "load_average_before": load_before,
            "shared": load_before > SHARED_LOAD,
        },
        "draft": levels,
        "ngram": ngram,
        "headline": headline(levels, ngram),
        "mismatches": sum(row[mode]["mismatches"] for row in rows for mode in MODES),
    }


def report(results: dict[str, Any]) -> None:
    """One table: the pairs' rows by measured acceptance and batch, then the n-gram rows."""
    settings, host = results["settings"], results["machine"]
    table = []

    def add(label: str, row: dict[str, Any]) -> None:
        off, fixed, auto = (row[mode] for mode in MODES)
        table.append(
            [
                label,
                str(row["batch"]),
                fmt(off["tokens_per_s"]),
                f"{fmt(fixed['tokens_per_s'])} ({fixed['tokens_per_s_ratio']:.2f}x)",
                f"{fmt(auto['tokens_per_s'])} ({auto['tokens_per_s_ratio']:.2f}x)",
                f"{fixed['cpu_tokens_per_s_ratio']:.2f}x | {auto['cpu_tokens_per_s_ratio']:.2f}x",
                f"{fixed['acceptance_rate']:.2f} | {auto['acceptance_rate']:.2f}",
                f"{fixed['mean_accepted_length']:.2f}",
                f"{auto['mean_k']:.2f}",
                " | ".join(fmt(1e3 * row[mode]["mean_latency_s"]) for mode in MODES),
                str(sum(row[mode]["mismatches"] for mode in MODES)),
            ]
        )

    for level in results["draft"]:
        for row in level["rows"]:
            add(f"draft {level['measured_acceptance']:.2f} (scale {level['upper_scale']:g})", row)
    ngram = results["ngram"]
    for row in ngram["rows"]:
        add(f"ngram {ngram['measured_acceptance']:.2f} (self-quoting)", row)
    load = host["load_average_before"]
    layers = results["calibration"]["draft_layers"]
    title = (
        f"Speculative decoding, {settings['preset']} target, {layers}-layer draft; greedy, "
        f"{settings['prompt_len']}-token prompts, {settings['output_len']} output tokens, best of "
        f"{settings['repeats']}; {host['torch_threads']} torch thread(s) on {host['cpu_count']} "
        "CPUs, "
        + (f"SHARED machine (load average {load:.1f} before the run)" if host["shared"] else "idle")
    )
    header = [
        "proposer (measured acceptance)",
        "batch",
        "off tok/s",
        f"k={settings['fixed_k']} tok/s (x off)",
        "auto tok/s (x off)",
        "CPU-time x: k | auto",
        "acceptance: k | auto",
        "accepted/step k",
        "mean k auto",
        "latency ms: off | k | auto",
        "mismatches",
    ]
    print_table(title, header, table)
    head = results["headline"]
    for clock in ("wall", "cpu"):
        print(
            f"{clock} time: batch 1, best draft: fixed k "
            f"{head[f'batch1_best_draft_fixed_x_off_{clock}']:.2f}x, auto "
            f"{head[f'batch1_best_draft_auto_x_off_{clock}']:.2f}x off (target >= 2x); auto at "
            f"the largest batch >= {head[f'largest_batch_auto_min_x_off_{clock}']:.2f}x, "
            f"anywhere >= {head[f'auto_min_x_off_{clock}']:.2f}x off (target >= 0.95x)"
        )
    print(f"greedy mismatches against speculation off: {results['mismatches']}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="manta bench spec_decode", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--preset", default="small", choices=sorted(CALIBRATION))
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--out", default="benchmarks/results/spec_decode.json")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    return run_benchmark(argv, parse_args, run, report)


if __name__ == "__main__":
    sys.exit(main())
