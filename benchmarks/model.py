"""Raw model speed on the paged cache: prefill and decode tokens/s at batch 1 and 32.

`python -m benchmarks.model [--preset bench] [--threads N] [--out benchmarks/results/model.json]`
Runs the model runner directly (no scheduler), so the numbers are the model's own cost.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import checkpoint, matmul_flops_rate, write_json
from workers import Engine, EngineConfig


def _time(fn, repeats: int) -> float:
    fn()  # warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure(engine: Engine, batch: int, prompt_len: int, repeats: int) -> dict[str, float]:
    """Prefill `batch` prompts of `prompt_len` tokens in one step, then one decode step."""
    bs = engine.config.block_size
    blocks_per_seq = -(-(prompt_len + 1) // bs)
    tables = [list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)) for i in range(batch)]
    tokens = [[(7 * i + j) % 1000 + 5 for j in range(prompt_len + 1)] for i in range(batch)]
    runner = engine.runner

    def prefill():
        runner.execute(
            tokens, [0] * batch, [prompt_len] * batch, tables, [[prompt_len - 1]] * batch
        )

    def decode():
        runner.execute(tokens, [prompt_len] * batch, [1] * batch, tables, [[0]] * batch)

    prefill_s = _time(prefill, repeats)
    decode_s = _time(decode, repeats)
    flops = engine.model_config.matmul_flops_per_token()
    return {
        "batch": batch,
        "prompt_len": prompt_len,
        "prefill_tokens_per_s": batch * prompt_len / prefill_s,
        "decode_tokens_per_s": batch / decode_s,
        "prefill_gflops": batch * prompt_len * flops / prefill_s / 1e9,
        "decode_gflops": batch * flops / decode_s / 1e9,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="bench")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/model.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model_dir = checkpoint(args.preset)
    engine = Engine(
        EngineConfig(
            model=str(model_dir),
            num_blocks=40 * (args.prompt_len // 16 + 2),
            max_num_batched_tokens=32 * args.prompt_len,
        )
    )
    roofline = matmul_flops_rate() / 1e9
    rows = [measure(engine, b, args.prompt_len, args.repeats) for b in (1, 32)]
    params = engine.model_config.num_parameters()
    print(f"{args.preset}: {params / 1e6:.1f}M parameters, {args.threads} threads, "
          f"fp32 matmul roofline {roofline:.1f} GFLOP/s")  # fmt: skip
    print(f"{'batch':>5} {'prefill tok/s':>14} {'decode tok/s':>13} {'prefill %roof':>14} "
          f"{'decode %roof':>13}")  # fmt: skip
    for r in rows:
        prefill_pct = 100 * r["prefill_gflops"] / roofline
        decode_pct = 100 * r["decode_gflops"] / roofline
        print(
            f"{r['batch']:>5} {r['prefill_tokens_per_s']:>14.1f} "
            f"{r['decode_tokens_per_s']:>13.1f} {prefill_pct:>13.0f}% {decode_pct:>12.0f}%"
        )
    result = {"preset": args.preset, "parameters": params, "threads": args.threads,
              "roofline_gflops": roofline, "rows": rows}  # fmt: skip
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
