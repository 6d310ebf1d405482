"""vLLM's offline `LLM.generate` over prompt sets given as token ids, timed per set.

Run with the peer venv's python (it imports only vLLM, psutil and the standard library):

    python vllm_offline.py --prompts SETS.json --mode eager|compiled --out RESULT.json

SETS.json holds ``{"model", "max_tokens", "max_model_len", "max_num_seqs", "warmup": [ids...],
"runs": [[ids...], ...]}``; every run should be fresh prompts, since vLLM's prefix cache would
serve a repeated set. RESULT.json gets the engine start time and, per run, the output tokens,
wall seconds, CPU seconds over the whole process tree (the engine core is a child process)
and the greedy token ids.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import psutil


def tree_cpu_s(root: psutil.Process) -> dict[tuple[int, float], float]:
    """User + system CPU seconds of ``root`` and every live descendant, keyed by (pid, start)."""
    seen = {}
    for proc in [root, *root.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            seen[(proc.pid, proc.create_time())] = times.user + times.system
        except psutil.Error:
            continue
    return seen


def cpu_between(before: dict, after: dict) -> float:
    """CPU seconds the tree spent between two snapshots (processes born in between count fully)."""
    return sum(cpu - before.get(key, 0.0) for key, cpu in after.items())


def generate(llm, prompt_sets: list[list[int]], max_tokens: int) -> tuple[list[list[int]], float]:
    """Greedy tokens for every prompt (in order) and the wall seconds ``generate`` took."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_sets]
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - start
    return [list(out.outputs[0].token_ids) for out in outs], wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", required=True, type=Path)
    parser.add_argument("--mode", required=True, choices=["eager", "compiled"])
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    spec = json.loads(args.prompts.read_text(encoding="utf-8"))
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM

    start = time.perf_counter()
    llm = LLM(
        model=spec["model"],
        dtype="float32",
        max_model_len=spec["max_model_len"],
        max_num_seqs=spec["max_num_seqs"],
        enforce_eager=args.mode == "eager",
        seed=0,
    )
    start_s = time.perf_counter() - start
    max_tokens = spec["max_tokens"]
    generate(llm, spec["warmup"], max_tokens)
    root = psutil.Process()
    runs = []
    for prompt_set in spec["runs"]:
        before = tree_cpu_s(root)
        token_ids, wall = generate(llm, prompt_set, max_tokens)
        cpu = cpu_between(before, tree_cpu_s(root))
        runs.append(
            {
                "output_tokens": sum(len(ids) for ids in token_ids),
                "wall_s": wall,
                "cpu_s": cpu,
                "token_ids": token_ids,
            }
        )
    import vllm

    result = {"system": f"vllm-{args.mode}", "version": vllm.__version__, "start_s": start_s}
    args.out.write_text(json.dumps({**result, "runs": runs}), encoding="utf-8")


if __name__ == "__main__":
    main()
