"""One worker's engine against `transformers` static batching, on one shared-prefix trace.

A seeded trace (half the requests share a long system prompt; Poisson arrivals plus a burst)
is replayed in real time against a Manta `Engine`, then against `transformers` `generate` over
static left-padded batches of 8, in the same process. Also measured: TTFT of a request whose
1024-token prefix is cached against prefix caching off, CPU time of one scheduler step at 256
running sequences, and achieved prefill/decode FLOP/s against this machine's matmul rate.

    python -m benchmarks.engine [--preset bench] [--num-requests N] [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    Replay,
    TraceRequest,
    TraceSpec,
    attention_flops,
    checkpoint,
    fmt,
    machine,
    make_trace,
    matmul_flops_rate,
    print_table,
    random_ids,
    replay_transformers,
    run_benchmark,
)
from workers import Engine, EngineConfig, SamplingParams
from workers.batching_policy import FixedBatchingPolicy
from workers.block_pool import BlockPool
from workers.kv_cache import KVCacheManager
from workers.model.make_model import PRESETS
from workers.model.paged_cache import kv_block_bytes
from workers.request import Request
from workers.scheduler import Scheduler, SchedulerConfig

BLOCK_SIZE = 16
BASELINE_BATCH = 8
PREFIX_TOKENS = 1024
SCHEDULER_SEQS = 256


@dataclasses.dataclass(slots=True)
class Settings:
    """Sizes of one run; ``--quick`` shrinks everything to a smoke test."""

    trace: TraceSpec = dataclasses.field(default_factory=TraceSpec)
    decode_batch: int = 64
    scheduler_steps: int = 512
    repeats: int = 3  # of the prefix-TTFT and prefill measurements (best kept)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        settings = cls()
        if args.quick:
            quick_trace = TraceSpec(24, (8, 16), rate=20.0)
            settings = cls(quick_trace, decode_batch=8, scheduler_steps=64, repeats=2)
        trace = settings.trace
        trace.num_requests = args.num_requests or trace.num_requests
        trace.burst = trace.num_requests // 4
        trace.rate = args.rate or trace.rate
        trace.seed = args.seed
        return settings


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def run_to_end(engine: Engine, prompts: Sequence[list[int]], max_tokens: int) -> None:
    for prompt in prompts:
        engine.add_request(prompt, greedy(max_tokens))
    while engine.has_unfinished():
        engine.step()


# -- Manta ------------------------------------------------------------------------------------
def replay_manta(engine: Engine, trace: list[TraceRequest]) -> Replay:
    """Add each request once its arrival time has passed; step while work remains.

    After every step the pool is sampled (outside the CPU-time count): a request's KV bytes are
    the most blocks it held, each shared block split among its holders; pool utilization is the
    fraction of referenced slots that hold computed tokens (only a request's last block can be
    partly empty), at the step with the most referenced blocks and averaged over steps.
    """
    n = len(trace)
    kv, pool, bs = engine.kv, engine.kv.pool, engine.config.block_size
    dtype = engine.kv_caches[0].dtype
    first, done = [math.nan] * n, [math.nan] * n
    outputs: list[list[int]] = [[] for _ in trace]
    held = [0.0] * n
    peak_used, peak_utilization, used_total, holes_total, sampling_cpu = 0, 1.0, 0, 0, 0.0
    before = engine.stats()
    next_index = 0
    start, cpu_start = time.perf_counter(), time.process_time()
    while next_index < n or engine.has_unfinished():
        now = time.perf_counter() - start
        while next_index < n and trace[next_index].arrival_s <= now:
            request = trace[next_index]
            engine.add_request(request.prompt_ids, greedy(request.max_tokens), str(next_index))
            next_index += 1
        if not engine.has_unfinished():
            time.sleep(trace[next_index].arrival_s - now)
            continue
        deltas = engine.step()
        now = time.perf_counter() - start
        for delta in deltas:
            i = int(delta.request_id)
            if delta.new_token_ids and math.isnan(first[i]):
                first[i] = now
            outputs[i].extend(delta.new_token_ids)
            if delta.finished:
                done[i] = now
        sample_start = time.process_time()
        used = pool.num_blocks - pool.num_free_blocks
        holes = 0
        for request in engine.scheduler.running:
            table = kv.block_table(request.request_id)
            holes += len(table) * bs - request.num_computed_tokens
            share = sum(1 / pool.blocks[block_id].ref_cnt for block_id in table)
            i = int(request.request_id)
            held[i] = max(held[i], share)
        if used > peak_used:
            peak_used, peak_utilization = used, 1 - holes / (used * bs)
        used_total += used
        holes_total += holes
        sampling_cpu += time.process_time() - sample_start
    makespan = time.perf_counter() - start
    cpu = time.process_time() - cpu_start - sampling_cpu
    after = engine.stats()
    block_bytes = kv_block_bytes(engine.model_config, bs, dtype)
    counted = ("allocation_calls", "allocated_blocks", "num_preemptions", "steps")
    extra = {key: after[key] - before[key] for key in counted}
    queries = after["prefix_cache_queries"] - before["prefix_cache_queries"]
    hits = after["prefix_cache_hits"] - before["prefix_cache_hits"]
    extra.update(
        prefix_cache_hit_rate=hits / queries if queries else 0.0,
        peak_kv_bytes=peak_used * block_bytes,
        pool_utilization=peak_utilization,
        pool_utilization_mean=1 - holes_total / (used_total * bs),
    )
    arrivals = [r.arrival_s for r in trace]
    return Replay(
        ttft_s=[t - a for t, a in zip(first, arrivals)],
        latency_s=[t - a for t, a in zip(done, arrivals)],
        outputs=outputs,
        kv_bytes=[blocks * block_bytes for blocks in held],
        makespan_s=makespan,
        cpu_s=cpu,
        extra=extra,
    )


def prefix_ttft(engine: Engine, suffix_len: int, repeats: int, seed: int) -> float:
    """TTFT of prefix + suffix B run right after prefix + suffix A; best of fresh prefixes."""
    rng = random.Random(seed)
    vocab = engine.model_config.vocab_size
    times = []
    for _ in range(repeats):
        prefix = random_ids(rng, vocab, PREFIX_TOKENS)
        run_to_end(engine, [prefix + random_ids(rng, vocab, suffix_len)], 1)
        start = time.perf_counter()
        run_to_end(engine, [prefix + random_ids(rng, vocab, suffix_len)], 1)
        times.append(time.perf_counter() - start)
    return min(times)


def prefill_flops_rate(engine: Engine, num_seqs: int, prompt_len: int, repeats: int) -> float:
    """FLOP/s of steps that prefill ``num_seqs`` fresh prompts (one logits row each), best run."""
    cfg = engine.model_config
    rng = random.Random(1)
    lm_head = 2 * cfg.vocab_size * cfg.hidden_size
    per_seq = (
        prompt_len * (cfg.matmul_flops_per_token() - lm_head)
        + lm_head
        + attention_flops(cfg.q_size, cfg.num_hidden_layers, 0, prompt_len)
    )
    best = math.inf
    for _ in range(repeats):
        prompts = [random_ids(rng, cfg.vocab_size, prompt_len) for _ in range(num_seqs)]
        start = time.perf_counter()
        run_to_end(engine, prompts, 1)
        best = min(best, time.perf_counter() - start)
    return num_seqs * per_seq / best


def decode_flops_rate(engine: Engine, batch: int, prompt_len: int, max_tokens: int) -> float:
    """FLOP/s of the steps in which all ``batch`` sequences decode one token each.

    Needs an engine that admits the whole batch before the first request finishes (fixed
    batching with ``batch`` <= max_num_seqs and prompts that fit a few token budgets).
    """
    cfg = engine.model_config
    rng = random.Random(2)
    for _ in range(batch):
        engine.add_request(random_ids(rng, cfg.vocab_size, prompt_len), greedy(max_tokens))
    scheduler = engine.scheduler
    while scheduler.num_waiting or any(r.num_output_tokens == 0 for r in scheduler.running):
        engine.step()
    flops, seconds = 0, 0.0
    while len(scheduler.running) == batch:
        for request in scheduler.running:
            computed = request.num_computed_tokens
            flops += cfg.matmul_flops_per_token() + attention_flops(
                cfg.q_size, cfg.num_hidden_layers, computed, computed + 1
            )
        start = time.perf_counter()
        engine.step()
        seconds += time.perf_counter() - start
    while engine.has_unfinished():
        engine.step()
    if not seconds:
        raise RuntimeError(f"the {batch} sequences never decoded together")
    return flops / seconds


def scheduler_step_us(num_steps: int, prompt_len: int = 128) -> tuple[float, float]:
    """CPU and wall microseconds of one schedule() + update_from_output() at 256 decodes.

    The scheduler runs alone over a pool big enough for every sequence; the model is replaced
    by a fixed sampled token per request (the update appends it, checks the stop conditions,
    extends the block hashes and commits the KV, as in a real step).
    """
    rng = random.Random(3)
    max_len = prompt_len + num_steps + 1
    pool = BlockPool(SCHEDULER_SEQS * -(-max_len // BLOCK_SIZE))
    kv = KVCacheManager(pool, BLOCK_SIZE)
    budget = SCHEDULER_SEQS * prompt_len
    config = SchedulerConfig(
        max_num_seqs=SCHEDULER_SEQS, max_num_batched_tokens=budget, max_model_len=max_len
    )
    scheduler = Scheduler(config, kv, FixedBatchingPolicy(budget, SCHEDULER_SEQS))
    for i in range(SCHEDULER_SEQS):
        prompt = [rng.randrange(30000) for _ in range(prompt_len)]
        request = Request(
            str(i), prompt, greedy(num_steps + 1), time.monotonic(), block_size=BLOCK_SIZE
        )
        scheduler.add_request(request)
    prefill = scheduler.schedule()
    scheduler.update_from_output(prefill, [[7] for _ in prefill.requests])
    cpu, wall = 0.0, 0.0
    for _ in range(num_steps):
        sampled = [[7] for _ in range(SCHEDULER_SEQS)]
        cpu_start, wall_start = time.process_time(), time.perf_counter()
        out = scheduler.schedule()
        scheduler.update_from_output(out, sampled)
        cpu += time.process_time() - cpu_start
        wall += time.perf_counter() - wall_start
        if len(out.requests) != SCHEDULER_SEQS or out.total_tokens != SCHEDULER_SEQS:
            raise RuntimeError(f"expected {SCHEDULER_SEQS} decodes, scheduled {out.total_tokens}")
    return cpu / num_steps * 1e6, wall / num_steps * 1e6


# -- report -----------------------------------------------------------------------------------
RATIO_KEYS = (
    "output_tokens_per_s",
    "requests_per_s",
    "ttft_p50_s",
    "ttft_p99_s",
    "latency_p50_s",
    "latency_p99_s",
    "kv_bytes_per_request",
    "cpu_s_per_m_output_tokens",
)


def report(results: dict[str, Any]) -> None:
    """One table: what, Manta, the baseline, their ratio, the target from DESIGN.md, met."""
    manta, base, ratios = results["manta"], results["baseline"], results["ratios"]
    prefix, sched, roof = results["prefix_ttft"], results["scheduler"], results["roofline"]
    table = []

    def row(label: str, ours: str, theirs: str, ratio: str, target: str, met: bool | None) -> None:
        table.append(
            [label, ours, theirs, ratio, target, {None: "-", True: "yes", False: "no"}[met]]
        )

    targets = {"output_tokens_per_s": 4.0, "latency_p99_s": 0.3, "kv_bytes_per_request": 0.4}
    for key in RATIO_KEYS:
        scale, label = (2**-20, "kv_MiB_per_request") if key.startswith("kv") else (1.0, key)
        target = targets.get(key)
        higher = key.endswith("per_s")
        row(
            label,
            fmt(manta[key] * scale),
            fmt(base[key] * scale),
            f"{ratios[key]:.3g}x",
            "-" if target is None else f"{'>=' if higher else '<='} {target}x",
            None if target is None else (ratios[key] >= target) == higher,
        )
    utilization = manta["pool_utilization"]
    row(
        "pool_utilization (peak)",
        f"{utilization:.1%}",
        f"{base['pool_utilization']:.1%}",
        "-",
        ">= 95%",
        utilization >= 0.95,
    )
    row("block allocation_calls", fmt(manta["allocation_calls"]), "-", "-", "-", None)
    row("num_preemptions", fmt(manta["num_preemptions"]), "-", "-", "-", None)
    row(
        f"TTFT_s, {PREFIX_TOKENS}-token prefix: warm | cold",
        fmt(prefix["warm_s"]),
        fmt(prefix["cold_s"]),
        f"{prefix['ratio']:.3g}x",
        "<= 0.15x",
        prefix["ratio"] <= 0.15,
    )
    for phase, target in (("prefill", 0.75), ("decode", 0.5)):
        fraction = roof[f"{phase}_fraction"]
        row(
            f"{phase} GFLOP/s | fp32 matmul GFLOP/s",
            fmt(roof[f"{phase}_flops_per_s"] / 1e9),
            fmt(roof["matmul_flops_per_s"] / 1e9),
            f"{fraction:.1%}",
            f">= {target:.0%}",
            fraction >= target,
        )
    cpu_us = sched["cpu_us_per_step"]
    row(
        f"scheduler CPU us/step, {SCHEDULER_SEQS} decodes",
        fmt(cpu_us),
        "-",
        "-",
        "<= 200",
        cpu_us <= 200,
    )
    settings, host = results["settings"], results["machine"]
    title = (
        f"Engine benchmark: {results['model']['path']}, {settings['trace']['num_requests']} "
        f"requests, {settings['batching']} batching, {host['torch_threads']} torch threads, "
        f"load average {host['load_average_1m']:.1f} on {host['cpu_count']} CPUs"
    )
    header = ["what", "Manta", "transformers", "ratio", "target", "met"]
    print_table(title, header, table)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement of the benchmark, as the JSON-ready results."""
    settings = Settings.from_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = Path(args.model) if args.model else checkpoint(args.preset)
    cpu_us, wall_us = scheduler_step_us(settings.scheduler_steps)
    roofline = matmul_flops_rate(repeats=settings.repeats + 2)
    config = EngineConfig(
        model=str(model_dir), kv_cache_bytes=args.kv_cache_mib * 2**20, batching=args.batching
    )
    engine = Engine(config)
    model_config = engine.model_config
    trace = make_trace(settings.trace, model_config.vocab_size)
    run_to_end(engine, [random_ids(random.Random(4), model_config.vocab_size, 64)], 4)
    manta = replay_manta(engine, trace)
    warm = prefix_ttft(engine, 16, settings.repeats, settings.trace.seed)
    del engine
    # Fixed batching lets the roofline steps hold whole batches (the adaptive policy trickles a
    # long queue in); a lone request gets the full token budget under either policy.
    other = Engine(dataclasses.replace(config, enable_prefix_caching=False, batching="fixed"))
    cold = prefix_ttft(other, 16, settings.repeats, settings.trace.seed)
    prefill = prefill_flops_rate(other, 4, 512, settings.repeats)
    decode = decode_flops_rate(other, settings.decode_batch, 64, settings.trace.output_len[0])
    del other
    baseline = replay_transformers(model_dir, trace, BASELINE_BATCH)

    manta_metrics, base_metrics = manta.metrics(), baseline.metrics()
    matches = sum(a == b for a, b in zip(manta.outputs, baseline.outputs))
    return {
        "benchmark": "engine",
        "model": {
            "path": str(model_dir),
            "num_parameters": model_config.num_parameters(),
            "matmul_flops_per_token": model_config.matmul_flops_per_token(),
        },
        "settings": {
            **dataclasses.asdict(settings),
            "batching": config.batching,
            "kv_cache_bytes": config.kv_cache_bytes,
            "baseline_batch": BASELINE_BATCH,
        },
        "machine": machine(),
        "manta": manta_metrics,
        "baseline": base_metrics,
        "ratios": {key: manta_metrics[key] / base_metrics[key] for key in RATIO_KEYS},
        "prefix_ttft": {"warm_s": warm, "cold_s": cold, "ratio": warm / cold},
        "scheduler": {"cpu_us_per_step": cpu_us, "wall_us_per_step": wall_us},
        "roofline": {
            "matmul_flops_per_s": roofline,
            "prefill_flops_per_s": prefill,
            "decode_flops_per_s": decode,
            "prefill_fraction": prefill / roofline,
            "decode_fraction": decode / roofline,
        },
        "outputs": {
            "manta_token_counts": [len(tokens) for tokens in manta.outputs],
            "baseline_token_counts": [len(tokens) for tokens in baseline.outputs],
            "identical_fraction": matches / len(trace),
        },
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="manta bench engine", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="bench", choices=sorted(PRESETS))
    parser.add_argument("--model", help="an existing checkpoint directory (overrides --preset)")
    parser.add_argument("--num-requests", type=int, help="trace length (default 200, quick 24)")
    parser.add_argument("--rate", type=float, help="Poisson arrival rate, requests/s")
    parser.add_argument("--batching", default="adaptive", choices=["adaptive", "fixed"])
    parser.add_argument("--kv-cache-mib", type=int, default=512, help="Manta's KV pool")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a small, short smoke run")
    parser.add_argument("--out", default="benchmarks/results/engine.json")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    return run_benchmark(argv, parse_args, run, report)


if __name__ == "__main__":
    sys.exit(main())
