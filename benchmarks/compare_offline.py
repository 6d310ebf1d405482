"""The offline half of the peer comparison: every system in its own process, same prompt sets.

The parent writes the prompt sets (a warm-up set and one fresh set per timed run) to JSON; a
child per system reads them, warms up, times each set and writes the same result shape:
``{"system", "start_s", "runs": [{"output_tokens", "wall_s", "cpu_s", "token_ids"}]}``.
Manta and `transformers` run here as ``python -m benchmarks.compare_offline --system S``;
vLLM runs `benchmarks/peers/vllm_offline.py` with its venv's python.

    python -m benchmarks.compare_offline --system manta|transformers --prompts F --out F
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

from benchmarks.common import TraceRequest, TraceSpec, make_trace
from benchmarks.compare_procs import VLLM_ENV, cpu_between, tree_cpu_s

PEERS_DIR = Path(__file__).parent / "peers"
MAX_MODEL_LEN = 512  # longest trace prompt (288) plus 48 output tokens, with room to spare
MAX_NUM_SEQS = 64


def trace_prompts(num_requests: int, output_len: int, system_len: int, seed: int, vocab: int):
    """The prompts (token ids) of one all-at-once shared-prefix trace."""
    spec = TraceSpec(num_requests, (output_len, output_len), system_len, 1e9, burst=0, seed=seed)
    return [r.prompt_ids for r in make_trace(spec, vocab)]


def prompt_spec(
    model_dir: Path, vocab: int, num_requests: int, max_tokens: int, seeds: Sequence[int]
) -> dict[str, Any]:
    """The JSON every offline runner reads: seeds[0] is the warm-up set, the rest timed runs;
    one more fresh set, for Manta's profiled run, follows them."""
    sets = [trace_prompts(num_requests, max_tokens, 192, seed, vocab) for seed in seeds]
    return {
        "model": str(model_dir),
        "max_tokens": max_tokens,
        "max_model_len": MAX_MODEL_LEN,
        "max_num_seqs": MAX_NUM_SEQS,
        "warmup": sets[0],
        "runs": sets[1:],
        "profile": trace_prompts(num_requests, max_tokens, 192, max(seeds) + 1, vocab),
    }


# -- the children ------------------------------------------------------------------------------
def run_manta(spec: dict[str, Any]) -> dict[str, Any]:
    """Manta's offline `LLM.generate`, once per prompt set, CPU over the process tree."""
    from benchmarks.step_profile import profile_run
    from workers import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(model=spec["model"], dtype="float32")
    start_s = time.perf_counter() - start
    params = SamplingParams(max_tokens=spec["max_tokens"], temperature=0.0, ignore_eos=True)
    llm.generate(spec["warmup"], params)
    root = psutil.Process()
    runs = []
    for prompts in spec["runs"]:
        before, wall = tree_cpu_s(root), time.perf_counter()
        outs = llm.generate(prompts, params)
        wall = time.perf_counter() - wall
        token_ids = [list(out.outputs[0].token_ids) for out in outs]
        runs.append(run_record(token_ids, wall, cpu_between(before, tree_cpu_s(root))))
    profiled = profile_run(lambda: llm.generate(spec["profile"], params))
    return {"system": "manta", "start_s": start_s, "runs": runs, "profile": profiled}


def run_transformers(spec: dict[str, Any]) -> dict[str, Any]:
    """`generate` over static left-padded batches of 8 (all arrivals at 0), once per set."""
    from benchmarks.common import replay_transformers

    runs = []
    for prompts in spec["runs"]:
        trace = [TraceRequest(0.0, ids, spec["max_tokens"]) for ids in prompts]
        replay = replay_transformers(spec["model"], trace, 8)
        runs.append(run_record(replay.outputs, replay.makespan_s, replay.cpu_s))
    return {"system": "transformers", "start_s": 0.0, "runs": runs}


def run_record(token_ids: list[list[int]], wall_s: float, cpu_s: float) -> dict[str, Any]:
    return {
        "output_tokens": sum(len(ids) for ids in token_ids),
        "wall_s": wall_s,
        "cpu_s": cpu_s,
        "token_ids": token_ids,
    }


# -- the parent --------------------------------------------------------------------------------
def run_child(cmd: list[str], spec: dict[str, Any], log_path: Path, env: dict[str, str]) -> dict:
    """Run one offline runner on ``spec``; its output goes to ``log_path``, its result back."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="manta-compare-") as tmp:
        prompts, out = Path(tmp) / "prompts.json", Path(tmp) / "result.json"
        prompts.write_text(json.dumps(spec), encoding="utf-8")
        start = time.perf_counter()
        with log_path.open("wb") as log:
            done = subprocess.run(
                [*cmd, "--prompts", str(prompts), "--out", str(out)],
                env={**os.environ, **env},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        if done.returncode != 0:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
            raise RuntimeError(f"{cmd[-1]} exited with {done.returncode}:\n{tail}")
        result = json.loads(out.read_text(encoding="utf-8"))
    result["process_s"] = time.perf_counter() - start
    return result


def offline_system(system: str, spec: dict[str, Any], log_dir: Path, peer_python: Path | None):
    """One system's offline result; ``system`` is manta, transformers, vllm-eager or -compiled."""
    if system.startswith("vllm-"):
        script = str(PEERS_DIR / "vllm_offline.py")
        cmd = [str(peer_python), script, "--mode", system.removeprefix("vllm-")]
        return run_child(cmd, spec, log_dir / f"offline-{system}.log", VLLM_ENV)
    cmd = [sys.executable, "-m", "benchmarks.compare_offline", "--system", system]
    return run_child(cmd, spec, log_dir / f"offline-{system}.log", {})


def offline_summary(result: dict[str, Any], reference: list[list[list[int]]] | None) -> dict:
    """Per-run and median throughput and CPU; identical greedy requests against ``reference``."""
    runs = [
        {
            "output_tokens": run["output_tokens"],
            "wall_s": run["wall_s"],
            "cpu_s": run["cpu_s"],
            "tokens_per_s": run["output_tokens"] / run["wall_s"],
            "cpu_s_per_token": run["cpu_s"] / run["output_tokens"],
        }
        for run in result["runs"]
    ]
    summary = {
        "system": result["system"],
        "profile": result.get("profile"),
        "start_s": result.get("start_s", 0.0),
        "process_s": result.get("process_s", 0.0),
        "runs": runs,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
        "cpu_s_per_run": statistics.median(r["cpu_s"] for r in runs),
        "cpu_s_per_token": statistics.median(r["cpu_s_per_token"] for r in runs),
        "cores_busy": statistics.median(r["cpu_s"] / r["wall_s"] for r in runs),
    }
    if reference is not None:
        pairs = [(a, b) for ours, theirs in zip(reference, result["runs"])
                 for a, b in zip(ours, theirs["token_ids"])]  # fmt: skip
        summary["identical_to_manta"] = sum(a == b for a, b in pairs)
        summary["compared_requests"] = len(pairs)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one offline runner of benchmarks.compare")
    parser.add_argument("--system", required=True, choices=["manta", "transformers"])
    parser.add_argument("--prompts", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    spec = json.loads(args.prompts.read_text(encoding="utf-8"))
    result = run_manta(spec) if args.system == "manta" else run_transformers(spec)
    args.out.write_text(json.dumps(result), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
