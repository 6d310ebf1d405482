"""Prefix-cache hit rate of request routing: round-robin, prefix-aware and an oracle.

One seeded multi-tenant trace (each tenant has its own long system prompt; requests are that
prompt plus a short unique part) is streamed through the served app, on 4 workers whose KV
pools hold only a few tenants' prompts each, once per routing policy with cold caches. The
oracle (tenant t always on worker t % 4) is replayed on in-process engines with the same
pools, and so is round-robin, as a cross-check of the served number. The router's weights
are the product defaults (`RouterSettings`) unless given as flags.

    python -m benchmarks.routing [--quick] [--preset small] [--load-weight W ...] [--out PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import random
import socket
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import ray
import torch
from prometheus_client.parser import text_string_to_metric_families
from ray import serve

from benchmarks.common import (
    checkpoint,
    fmt,
    machine,
    percentile,
    print_table,
    random_ids,
    run_benchmark,
    sse_lines,
)
from cluster.app import build_app
from cluster.config import ClusterConfig, RouterSettings
from kvstore.index_actor import kill_index_actor
from workers import Engine, EngineConfig, SamplingParams
from workers.model.config import ModelConfig

SERVED = ("round_robin", "prefix")
POLICIES = (*SERVED, "oracle")
WEIGHTS = ("hit_weight", "load_weight", "kv_pressure_weight", "affinity_bonus")
BLOCK_SIZE = 16


def pool_blocks(pool_tenants: float, system_len: int) -> int:
    """A worker's KV blocks: room for `pool_tenants` system prompts of `system_len` tokens."""
    return math.ceil(pool_tenants * system_len / BLOCK_SIZE)


@dataclasses.dataclass(slots=True)
class Settings:
    """The trace and the cluster; ``--quick`` shrinks the trace."""

    num_requests: int = 320
    num_tenants: int = 16
    num_workers: int = 4
    system_len: int = 256
    user_len: tuple[int, int] = (8, 24)  # drawn uniformly per request
    output_len: int = 8
    concurrency: int = 8
    pool_tenants: float = 5.5  # system prompts one worker's KV pool can hold
    publish_interval_s: float = 0.2
    seed: int = 0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        settings = cls(num_requests=96) if args.quick else cls()
        settings.num_requests = args.num_requests or settings.num_requests
        settings.pool_tenants = args.pool_tenants or settings.pool_tenants
        settings.seed = args.seed
        return settings

    @property
    def num_blocks(self) -> int:
        return pool_blocks(self.pool_tenants, self.system_len)


@dataclasses.dataclass(slots=True)
class TenantRequest:
    tenant: int
    prompt_ids: list[int]
    arrival_s: float = 0.0  # the bursty mix's open-loop send time


def make_trace(settings: Settings, vocab_size: int) -> list[TenantRequest]:
    """Tenants in a seeded random order, each equally often (up to one request)."""
    rng = random.Random(settings.seed)
    length, count = settings.system_len, settings.num_tenants
    systems = [random_ids(rng, vocab_size, length) for _ in range(count)]
    tenants = [i % settings.num_tenants for i in range(settings.num_requests)]
    rng.shuffle(tenants)
    return [
        TenantRequest(t, systems[t] + random_ids(rng, vocab_size, rng.randint(*settings.user_len)))
        for t in tenants
    ]


def cluster_config(
    model_dir: Path, settings: Settings, policy: str, weights: dict[str, float]
) -> ClusterConfig:
    return ClusterConfig(
        model=str(model_dir),
        served_model_name=f"routing-{policy}",
        num_workers=settings.num_workers,
        num_cpus_per_worker=0.25,  # four workers share the machine's cores
        publish_interval_s=settings.publish_interval_s,
        slo_ttft_s=None,  # every request is measured: shedding would drop what is compared
        engine=dict(block_size=BLOCK_SIZE, num_blocks=settings.num_blocks),
        router=RouterSettings(policy=policy, **weights),
    )


# -- in-process replay ---------------------------------------------------------------------------
def simulate(
    config: EngineConfig,
    settings: Settings,
    trace: list[TenantRequest],
    assign: Callable[[int, TenantRequest], int],
) -> dict[str, Any]:
    """Replay the trace on one engine per worker, ``concurrency`` requests in flight in order.

    Torch gets one thread, as each served worker has: on small steps more threads mostly wait on
    each other (4x slower here on a busy machine).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        engines = [Engine(config) for _ in range(settings.num_workers)]
        return _replay(engines, settings, trace, assign)
    finally:
        torch.set_num_threads(threads)


def _replay(
    engines: list[Engine],
    settings: Settings,
    trace: list[TenantRequest],
    assign: Callable[[int, TenantRequest], int],
) -> dict[str, Any]:
    params = SamplingParams(max_tokens=settings.output_len, temperature=0.0, ignore_eos=True)
    pending = deque(enumerate(trace))
    in_flight: set[str] = set()
    spread = [0] * settings.num_workers
    # Each request needs its prefill chunk(s) and one step per output token.
    max_rounds = len(trace) * (settings.output_len + 4)
    for _ in range(max_rounds):
        while pending and len(in_flight) < settings.concurrency:
            i, request = pending.popleft()
            worker = assign(i, request)
            engines[worker].add_request(request.prompt_ids, params, str(i))
            in_flight.add(str(i))
            spread[worker] += 1
        if not in_flight:
            break
        for engine in engines:
            in_flight -= {d.request_id for d in engine.step() if d.finished}
    else:
        raise RuntimeError(f"the replay did not finish in {max_rounds} rounds")
    stats = [engine.stats() for engine in engines]
    hits = sum(s["prefix_cache_hits"] for s in stats)
    queries = sum(s["prefix_cache_queries"] for s in stats)
    return {"hit_rate": hits / queries, "requests_per_worker": sorted(spread)}


# -- the served app ------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker_counters(text: str) -> dict[str, dict[str, float]]:
    """The per-worker samples of a ``/metrics`` page: {sample name: {worker: value}}."""
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if "replica" in sample.labels:
                out.setdefault(sample.name, {})[sample.labels["replica"]] = sample.value
    return out


async def settled(
    client: httpx.AsyncClient, num_workers: int, min_tokens: float, timeout_s: float = 30.0
) -> dict[str, dict[str, float]]:
    """Scrape until every worker has reported and ``min_tokens`` generated tokens show."""
    generated: dict[str, float] = {}
    for _ in range(round(timeout_s / 0.1)):
        response = await client.get("/metrics")
        response.raise_for_status()
        counters = worker_counters(response.text)
        generated = counters.get("manta_generation_tokens_total", {})
        if len(generated) >= num_workers and sum(generated.values()) >= min_tokens:
            return counters
        await asyncio.sleep(0.1)
    raise RuntimeError(f"/metrics did not settle in {timeout_s} s: {generated}")


async def stream_one(
    client: httpx.AsyncClient, model: str, prompt: list[int], max_tokens: int
) -> tuple[float, int, float]:
    """Stream one completion: (seconds to the first chunk with a choice, completion tokens,
    seconds to the end)."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    ttft, tokens = math.nan, 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in sse_lines(response):
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if "error" in chunk:
                raise RuntimeError(f"stream failed: {chunk['error']}")
            if chunk.get("choices") and math.isnan(ttft):
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return ttft, tokens, time.perf_counter() - start


async def drive(
    base_url: str, model: str, settings: Settings, trace: list[TenantRequest]
) -> dict[str, Any]:
    """Stream the trace with ``concurrency`` in flight, in order; deltas of the workers' stats."""
    limit = asyncio.Semaphore(settings.concurrency)  # FIFO: requests start in trace order
    timeout = httpx.Timeout(120.0)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout, trust_env=False) as client:

        async def one(prompt: list[int]) -> tuple[float, int, float]:
            async with limit:
                return await stream_one(client, model, prompt, settings.output_len)

        # Shorter than a block: wakes every worker and leaves nothing in any cache.
        warmup = [[i] * (BLOCK_SIZE - 1) for i in range(settings.concurrency)]
        await asyncio.gather(*(one(p) for p in warmup))
        before = await settled(client, settings.num_workers, len(warmup) * settings.output_len)
        start = time.perf_counter()
        results = await asyncio.gather(*(one(r.prompt_ids) for r in trace))
        makespan = time.perf_counter() - start
        expected = (len(warmup) + len(trace)) * settings.output_len
        after = await settled(client, settings.num_workers, expected)

    def delta(name: str) -> dict[str, float]:
        old = before.get(name, {})
        return {w: v - old.get(w, 0.0) for w, v in after.get(name, {}).items()}

    hits = delta("manta_prefix_cache_hits_total")
    queries = delta("manta_prefix_cache_queries_total")
    generated = delta("manta_generation_tokens_total")
    ttfts = [ttft for ttft, _, _ in results]
    tokens = sum(n for _, n, _ in results)
    return {
        "hit_rate": sum(hits.values()) / sum(queries.values()),
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p99_s": percentile(ttfts, 99),
        "output_tokens_per_s": tokens / makespan,
        "requests_per_s": len(trace) / makespan,
        "makespan_s": makespan,
        "requests_per_worker": sorted(round(n / settings.output_len) for n in generated.values()),
        "hit_rate_per_worker": sorted(hits[w] / queries[w] for w in queries if queries[w]),
    }


def serve_policy(
    config: ClusterConfig, port: int, settings: Settings, trace: list[TenantRequest]
) -> dict[str, Any]:
    """Deploy the app cold, stream the trace through it, and tear it down."""
    serve.run(build_app(config), name="manta-routing", route_prefix="/")
    try:
        base_url = f"http://127.0.0.1:{port}"
        return asyncio.run(drive(base_url, config.model_name, settings, trace))
    finally:
        serve.delete("manta-routing")
        kill_index_actor(config.model_name)


# -- the bursty multi-tenant mix -----------------------------------------------------------------
BURSTY_SERVED = ("prefix", "predicted_latency")


@dataclasses.dataclass(slots=True)
class BurstySettings:
    """Open-loop arrivals: every tenant at a calm rate, and surges in which one tenant (a
    different one each time, "the launch that goes viral") sends `surge_factor` times the
    calm rate of the whole mix on its own. Goodput counts the requests within both SLOs."""

    duration_s: float = 40.0
    num_tenants: int = 8
    # One core each: on this 2-core machine, more workers would only split the same cores.
    num_workers: int = 2
    system_len: int = 256
    user_len: tuple[int, int] = (16, 64)
    output_len: int = 32
    calm_rate: float = 3.0  # requests/s over all tenants
    surge_factor: float = 8.0  # past one worker's capacity: where the choice of worker matters
    surge_len_s: float = 4.0
    calm_len_s: float = 6.0
    pool_tenants: float = 6.0
    slo_ttft_s: float = 1.0
    slo_itl_s: float = 0.1  # mean seconds per output token after the first
    warmup_requests: int = 64  # unrelated prompts: wake the workers, teach the predictor
    publish_interval_s: float = 0.2
    seed: int = 0
    # Runs of both policies, each on a trace of its own (seed + run), the order alternating:
    # one run's ratio moves by as much as the policies differ.
    repeats: int = 3

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> BurstySettings:
        settings = cls(duration_s=16.0, warmup_requests=48, repeats=1) if args.quick else cls()
        settings.repeats = args.repeats or settings.repeats
        settings.duration_s = args.duration or settings.duration_s
        settings.calm_rate = args.calm_rate or settings.calm_rate
        settings.surge_factor = args.surge_factor or settings.surge_factor
        settings.seed = args.seed
        return settings

    @property
    def num_blocks(self) -> int:
        return pool_blocks(self.pool_tenants, self.system_len)


def make_bursty_trace(settings: BurstySettings, vocab_size: int) -> list[TenantRequest]:
    rng = random.Random(settings.seed)
    length, count = settings.system_len, settings.num_tenants
    systems = [random_ids(rng, vocab_size, length) for _ in range(count)]
    arrivals: list[tuple[float, int]] = []

    def poisson(start: float, end: float, rate: float, tenant: int | None) -> None:
        t = start + rng.expovariate(rate)
        while t < end:
            arrivals.append((t, rng.randrange(settings.num_tenants) if tenant is None else tenant))
            t += rng.expovariate(rate)

    poisson(0.0, settings.duration_s, settings.calm_rate, None)
    start = settings.calm_len_s / 2
    while start < settings.duration_s:
        end = min(start + settings.surge_len_s, settings.duration_s)
        viral = rng.randrange(settings.num_tenants)
        poisson(start, end, settings.calm_rate * settings.surge_factor, viral)
        start = end + settings.calm_len_s
    user = [random_ids(rng, vocab_size, rng.randint(*settings.user_len)) for _ in arrivals]
    return [
        TenantRequest(tenant, systems[tenant] + own, t)
        for (t, tenant), own in zip(sorted(arrivals), user)
    ]


def bursty_config(model_dir: Path, settings: BurstySettings, policy: str) -> ClusterConfig:
    return ClusterConfig(
        model=str(model_dir),
        served_model_name=f"routing-{policy}",
        num_workers=settings.num_workers,
        num_cpus_per_worker=0.5,
        publish_interval_s=settings.publish_interval_s,
        slo_ttft_s=None,  # nothing shed: both policies serve every request, judged by the SLOs
        engine=dict(block_size=BLOCK_SIZE, num_blocks=settings.num_blocks),
        # The SLO the goodput is judged by, which predicted latency routing aims at.
        router=RouterSettings(policy=policy, slo_ttft_s=settings.slo_ttft_s),
    )


async def drive_bursty(
    base_url: str, model: str, settings: BurstySettings, trace: list[TenantRequest]
) -> dict[str, Any]:
    """Warm up, send each request at its arrival time, and judge each by the SLOs."""
    rng = random.Random(settings.seed + 1)
    timeout = httpx.Timeout(120.0)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(
        base_url=base_url, timeout=timeout, trust_env=False, limits=limits
    ) as client:
        # Unrelated prompts of every length, 4 at a time: never a tenant's, so caches stay cold.
        warmup = [
            [rng.randrange(1, 512) for _ in range(rng.randint(8, settings.system_len))]
            for _ in range(settings.warmup_requests)
        ]
        gate = asyncio.Semaphore(4)

        async def warm(prompt: list[int]) -> None:
            async with gate:
                await stream_one(client, model, prompt, settings.output_len)

        await asyncio.gather(*(warm(p) for p in warmup))
        expected = len(warmup) * settings.output_len
        before = await settled(client, settings.num_workers, expected)
        start = time.perf_counter()

        async def one(request: TenantRequest) -> tuple[float, int, float]:
            await asyncio.sleep(max(0.0, start + request.arrival_s - time.perf_counter()))
            return await stream_one(client, model, request.prompt_ids, settings.output_len)

        results = await asyncio.gather(*(one(r) for r in trace))
        makespan = time.perf_counter() - start
        expected += len(trace) * settings.output_len
        after = await settled(client, settings.num_workers, expected)

    def delta(name: str) -> float:
        old = before.get(name, {})
        return sum(v - old.get(w, 0.0) for w, v in after.get(name, {}).items())

    ttfts = [ttft for ttft, _, _ in results]
    itls = [(total - ttft) / max(1, n - 1) for ttft, n, total in results]
    good = sum(
        ttft <= settings.slo_ttft_s and itl <= settings.slo_itl_s for ttft, itl in zip(ttfts, itls)
    )
    return {
        "goodput_rps": good / settings.duration_s,
        "within_slo": good / len(trace),
        "hit_rate": delta("manta_prefix_cache_hits_total")
        / delta("manta_prefix_cache_queries_total"),
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p99_s": percentile(ttfts, 99),
        "itl_p99_s": percentile(itls, 99),
        "e2e_p99_s": percentile([total for _, _, total in results], 99),
        "makespan_s": makespan,
    }


def run_bursty(args: argparse.Namespace) -> dict[str, Any]:
    settings = BurstySettings.from_args(args)
    model_dir = Path(args.model) if args.model else checkpoint(args.preset)
    vocab_size = ModelConfig.from_pretrained(model_dir).vocab_size
    trace = make_bursty_trace(settings, vocab_size)
    runs: list[dict[str, dict[str, Any]]] = []
    counts: list[int] = []  # requests in each run's trace
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for repeat in range(settings.repeats):
            run_settings = dataclasses.replace(settings, seed=settings.seed + repeat)
            if repeat:  # fresh prompts and arrivals for every run
                trace = make_bursty_trace(run_settings, vocab_size)
            order = BURSTY_SERVED if repeat % 2 == 0 else BURSTY_SERVED[::-1]
            runs.append({})
            counts.append(len(trace))
            for policy in order:
                config = bursty_config(model_dir, settings, policy)
                serve.run(build_app(config), name="manta-routing", route_prefix="/")
                try:
                    base_url = f"http://127.0.0.1:{port}"
                    runs[-1][policy] = asyncio.run(
                        drive_bursty(base_url, config.model_name, run_settings, trace)
                    )
                finally:
                    serve.delete("manta-routing")
                    kill_index_actor(config.model_name)
    finally:
        serve.shutdown()
        ray.shutdown()
    policies = {policy: {key: statistics.fmean(run[policy][key] for run in runs)
                         for key in runs[0][policy]}
                for policy in BURSTY_SERVED}  # fmt: skip
    for run in [*runs, policies]:  # each run's ratios, and those of the means
        base = run["prefix"]
        for metrics in run.values():
            metrics["goodput_vs_prefix"] = metrics["goodput_rps"] / max(base["goodput_rps"], 1e-9)
            metrics["hit_rate_vs_prefix"] = metrics["hit_rate"] / max(base["hit_rate"], 1e-9)
    return {
        "benchmark": "routing",
        "mix": "bursty",
        "model": {"path": str(model_dir)},
        "settings": {
            **dataclasses.asdict(settings),
            "num_blocks": settings.num_blocks,
            "num_requests": round(statistics.fmean(counts)),
            "requests_per_run": counts,
        },  # fmt: skip
        "machine": machine(),
        "policies": policies,
        "runs": runs,
    }


def report_bursty(results: dict[str, Any]) -> None:
    s, policies = results["settings"], results["policies"]
    title = (
        f"Routing, bursty multi-tenant mix: {s['num_requests']} requests over "
        f"{s['duration_s']:.0f} s, {s['num_tenants']} tenants, {s['num_workers']} workers, "
        f"surges of {s['surge_factor']:.0f}x from one tenant; SLOs TTFT {s['slo_ttft_s']} s, "
        f"ITL {s['slo_itl_s']} s; load {results['machine']['load_average_1m']:.2f}"
    )
    header = ["policy", "goodput r/s", "in SLO", "hit rate", "TTFT p50", "TTFT p99",
              "ITL p99", "goodput vs prefix", "hit rate vs prefix"]  # fmt: skip
    rows = [
        [policy, f"{m['goodput_rps']:.2f}", f"{m['within_slo']:.0%}", f"{m['hit_rate']:.3f}",
         fmt(m["ttft_p50_s"]), fmt(m["ttft_p99_s"]), fmt(m["itl_p99_s"]),
         f"{m['goodput_vs_prefix']:.2f}x", f"{m['hit_rate_vs_prefix']:.2f}x"]
        for policy, m in policies.items()
    ]  # fmt: skip
    if len(results["runs"]) > 1:
        title += f"; the mean of {len(results['runs'])} runs"
    print_table(title, header, rows)
    for i, run in enumerate(results["runs"]):
        m = run["predicted_latency"]
        print(f"run {i + 1}: goodput {m['goodput_vs_prefix']:.2f}x, hit rate "
              f"{m['hit_rate_vs_prefix']:.2f}x the prefix score's")  # fmt: skip
    predicted = policies["predicted_latency"]
    met = predicted["goodput_vs_prefix"] >= 1.2 and predicted["hit_rate_vs_prefix"] >= 0.95
    print(
        "target (predicted-latency >= 1.2x the prefix score's goodput, hit rate >= 0.95x): "
        f"{'met' if met else 'NOT met'}"
    )


# -- the run -------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict[str, Any]:
    settings = Settings.from_args(args)
    model_dir = Path(args.model) if args.model else checkpoint(args.preset)
    trace = make_trace(settings, ModelConfig.from_pretrained(model_dir).vocab_size)
    weights = {k: getattr(args, k) for k in WEIGHTS if getattr(args, k) is not None}
    configs = {p: cluster_config(model_dir, settings, p, weights) for p in SERVED}
    n, engine = settings.num_workers, configs["prefix"].engine_config()
    simulated = {
        "round_robin": simulate(engine, settings, trace, lambda i, r: i % n),
        "oracle": simulate(engine, settings, trace, lambda i, r: r.tenant % n),
    }
    policies: dict[str, dict[str, Any]] = {}
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for policy in SERVED:
            policies[policy] = serve_policy(configs[policy], port, settings, trace)
    finally:
        serve.shutdown()
        ray.shutdown()
    policies["oracle"] = dict(simulated["oracle"])
    for metrics in policies.values():
        metrics["vs_round_robin"] = metrics["hit_rate"] / policies["round_robin"]["hit_rate"]
        metrics["vs_oracle"] = metrics["hit_rate"] / policies["oracle"]["hit_rate"]
    return {
        "benchmark": "routing",
        "model": {"path": str(model_dir)},
        "settings": {**dataclasses.asdict(settings), "num_blocks": settings.num_blocks},
        "router": configs["prefix"].router.model_dump(),
        "machine": machine(),
        "policies": policies,
        "simulated": simulated,
    }


def report(results: dict[str, Any]) -> None:
    policies, s = results["policies"], results["settings"]
    rows = []
    for policy, m in policies.items():
        timed = [m[k] for k in ("ttft_p50_s", "ttft_p99_s", "output_tokens_per_s") if k in m]
        rows.append(
            [
                policy if policy in SERVED else f"{policy} (simulated)",
                f"{m['hit_rate']:.3f}",
                *([fmt(x) for x in timed] or ["-"] * 3),
                f"{m['vs_round_robin']:.2f}x",
                f"{m['vs_oracle']:.0%}",
                "/".join(str(n) for n in m["requests_per_worker"]),
            ]
        )
    title = (
        f"Routing benchmark: {s['num_requests']} requests, {s['num_tenants']} tenants, "
        f"{s['num_workers']} workers of {s['num_blocks']} KV blocks, {s['concurrency']} in flight"
    )
    header = ["policy", "hit rate", "TTFT p50 s", "TTFT p99 s", "tokens/s", "vs RR", "vs oracle"]
    print_table(title, [*header, "requests/worker"], rows)
    served_rr = policies["round_robin"]["hit_rate"]
    simulated_rr = results["simulated"]["round_robin"]["hit_rate"]
    print(f"round-robin hit rate: served {served_rr:.3f}, simulated {simulated_rr:.3f}")
    prefix = policies["prefix"]
    met = prefix["vs_round_robin"] >= 2 and prefix["vs_oracle"] >= 0.9
    print(f"target (prefix >= 2x round-robin, >= 90% of the oracle): {'met' if met else 'NOT met'}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="manta bench routing", description=__doc__.split("\n")[0])
    presets = ["tiny", "small", "bench"]
    parser.add_argument("--preset", choices=presets, help="default: small (quick: tiny)")
    parser.add_argument("--model", help="an existing checkpoint directory (overrides --preset)")
    parser.add_argument("--num-requests", type=int, help="trace length (default 320, quick 96)")
    parser.add_argument("--pool-tenants", type=float, help="system prompts a KV pool holds")
    parser.add_argument("--seed", type=int, default=0)
    for weight in WEIGHTS:
        flag = "--" + weight.replace("_", "-")
        parser.add_argument(flag, type=float, help="router weight (default: RouterSettings)")
    parser.add_argument(
        "--mix",
        choices=["tenants", "bursty"],
        default="tenants",
        help="tenants: hit rate of round-robin, prefix and an oracle, closed loop; bursty: "
        "goodput of the prefix score and predicted latency, open loop with surges",
    )
    parser.add_argument("--duration", type=float, help="bursty: seconds of arrivals")
    parser.add_argument("--calm-rate", type=float, help="bursty: requests/s between surges")
    parser.add_argument("--surge-factor", type=float, help="bursty: a surge's rate over calm")
    parser.add_argument(
        "--repeats", type=int, help="bursty: runs of both policies, each on its own trace (3)"
    )
    parser.add_argument("--quick", action="store_true", help="a short run on a tiny model")
    parser.add_argument("--out", help="default: benchmarks/results/routing[-bursty].json")
    args = parser.parse_args(argv)
    suffix = "-bursty" if args.mix == "bursty" else ""
    args.out = args.out or f"benchmarks/results/routing{suffix}.json"
    args.preset = args.preset or ("tiny" if args.quick else "small")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    if parse_args(argv).mix == "bursty":
        return run_benchmark(argv, parse_args, run_bursty, report_bursty)
    return run_benchmark(argv, parse_args, run, report)


if __name__ == "__main__":
    sys.exit(main())
