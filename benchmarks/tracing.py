"""What tracing costs: p50 and p99 latency of the served app with tracing off, and on at a
sample ratio of 1.0 exporting to a local OTLP collector, in the same run.

One worker (the ingress and the engine in one replica), closed-loop clients, short
completions: the shape where per-request overhead shows most. The modes alternate in rounds
on fresh prompts, so a drift of the machine's speed falls on both.

    python -m benchmarks.tracing [--requests 100] [--rounds 3] [--out PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import httpx
import ray
from ray import serve

from benchmarks.common import checkpoint, fmt, machine, percentile, print_table, run_benchmark
from benchmarks.otlp_collector import CollectorProcess
from benchmarks.routing import free_port
from cluster.app import build_app
from cluster.config import ClusterConfig
from kvstore.index_actor import kill_index_actor

MODES = ("off", "on")


async def timed_requests(base_url: str, model: str, prompts: list[list[int]], clients: int):
    """Latencies of `prompts`, `clients` at a time, each a non-streamed 8-token completion."""
    latencies: list[float] = []
    queue = list(prompts)

    async def client_loop(client: httpx.AsyncClient) -> None:
        while queue:
            prompt = queue.pop()
            body = {"model": model, "prompt": prompt, "max_tokens": 8, "ignore_eos": True}
            start = time.perf_counter()
            response = await client.post("/v1/completions", json=body)
            response.raise_for_status()
            latencies.append(time.perf_counter() - start)

    async with httpx.AsyncClient(base_url=base_url, timeout=60, trust_env=False) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
    return latencies


def run(args: argparse.Namespace) -> dict[str, Any]:
    collector = CollectorProcess()
    try:
        rounds = measure(args, collector.url)
        time.sleep(2)  # the exporters' last batches, flushed as their processes stopped
        received = collector.summary()
    finally:
        collector.stop()
    latencies = {mode: [x for r in by_round for x in r] for mode, by_round in rounds.items()}
    results = {
        mode: {"requests": len(values), "p50_s": percentile(values, 50),
               "p99_s": percentile(values, 99)}
        for mode, values in latencies.items()
    }  # fmt: skip
    results["on"]["requests_sent"] = len(latencies["on"]) + 8 * args.rounds  # with warm-ups
    results["on"]["traces_received"] = received["request_traces"]
    results["on"]["traces_router_and_worker"] = received["two_service_traces"]
    # Each round's ratio, from the two modes run back to back: the machine's speed drifts
    # between rounds by more than tracing costs.
    per_round = [
        percentile(on, 50) / percentile(off, 50) for off, on in zip(rounds["off"], rounds["on"])
    ]
    return {"benchmark": "tracing", "machine": machine(), "modes": results,
            "p50_on_vs_off": results["on"]["p50_s"] / results["off"]["p50_s"],
            "p50_on_vs_off_by_round": per_round,
            "p50_on_vs_off_median_round": statistics.median(per_round)}  # fmt: skip


def measure(args: argparse.Namespace, collector_url: str) -> dict[str, list[list[float]]]:
    """Each mode's latencies round by round, the modes alternating on fresh prompts."""
    model_dir = checkpoint("tiny")
    rng = random.Random(0)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(include_dashboard=False, log_to_driver=False)
    latencies: dict[str, list[list[float]]] = {mode: [] for mode in MODES}
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for round_index in range(args.rounds):
            for mode in MODES if round_index % 2 == 0 else MODES[::-1]:
                config = ClusterConfig(
                    model=str(model_dir), served_model_name=f"tracing-{mode}",
                    engine=dict(num_blocks=128), slo_ttft_s=None,
                    otlp_traces_endpoint=collector_url if mode == "on" else None,
                )  # fmt: skip
                serve.run(build_app(config), name="manta-tracing", route_prefix="/")
                try:
                    base_url = f"http://127.0.0.1:{port}"
                    warm = [[rng.randrange(1, 1000) for _ in range(16)] for _ in range(8)]
                    asyncio.run(timed_requests(base_url, config.model_name, warm, 4))
                    prompts = [[rng.randrange(1, 1000) for _ in range(32)]
                               for _ in range(args.requests)]  # fmt: skip
                    latencies[mode].append(
                        asyncio.run(
                            timed_requests(base_url, config.model_name, prompts, args.clients)
                        )
                    )
                finally:
                    serve.delete("manta-tracing")
                    kill_index_actor(config.model_name)
    finally:
        serve.shutdown()
        ray.shutdown()
    return latencies


def report(results: dict[str, Any]) -> None:
    modes = results["modes"]
    rows = [
        [mode, str(m["requests"]), fmt(m["p50_s"]), fmt(m["p99_s"])] for mode, m in modes.items()
    ]
    title = f"Tracing cost, load {results['machine']['load_average_1m']:.2f}"
    print_table(title, ["tracing", "requests", "p50 s", "p99 s"], rows)
    ratio = results["p50_on_vs_off"]
    on = modes["on"]
    by_round = ", ".join(f"{r:.3f}" for r in results["p50_on_vs_off_by_round"])
    print(
        f"p50 on / off, round by round: {by_round}; "
        f"median {results['p50_on_vs_off_median_round']:.3f}"
    )
    print(f"p50 on / off, all rounds: {ratio:.3f} (target <= 1.03); traces received: "
          f"{on['traces_received']} of {on['requests_sent']} requests sent, "
          f"{on['traces_router_and_worker']} with the router's and the worker's spans")  # fmt: skip


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="manta bench tracing", description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=100, help="timed requests per round")
    parser.add_argument("--rounds", type=int, default=8, help="rounds of off and on, alternating")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--out", default="benchmarks/results/tracing.json")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    return run_benchmark(argv, parse_args, run, report)


if __name__ == "__main__":
    sys.exit(main())
