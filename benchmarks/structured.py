"""Structured outputs: what the grammar mask costs per step, and what a schema costs to compile.

One engine decodes a batch of requests (all submitted at once, fixed output length, sampled
with seeds) twice per repeat: unconstrained, and constrained by a JSON schema whose strings
and arrays are long enough that no request finishes early; the best repeat of each counts, and
the time per step is the run's wall time over its steps. The compile figure is a fresh
compiler's first compile of a schema of about 2 KB, then the cached one.

    python -m benchmarks.structured [--preset small] [--batch 32] [--tokens 64] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from typing import Any

from benchmarks.common import checkpoint, fmt, machine, print_table, run_benchmark
from workers import LLM, SamplingParams
from workers.structured_output import StructuredOutputs


def schema_of_size(chars: int) -> dict:
    """An object schema of about `chars` characters: many fields of assorted kinds."""
    properties: dict[str, Any] = {}
    kinds = [{"type": "string", "maxLength": 4000}, {"type": "integer"},
             {"type": "array", "items": {"type": "string"}, "maxItems": 50},
             {"enum": ["alpha", "beta", "gamma"]}, {"type": "boolean"}]  # fmt: skip
    i = 0
    while len(json.dumps({"type": "object", "properties": properties})) < chars:
        properties[f"field_{i}"] = kinds[i % len(kinds)]
        i += 1
    return {"type": "object", "properties": properties, "required": ["field_0"]}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/structured.json")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    model = checkpoint(args.preset)
    llm = LLM(str(model), num_blocks=args.batch * 8, max_num_seqs=args.batch)
    # A string field first, long enough that the grammar never ends a request early.
    schema = {"type": "object", "properties": {"text": {"type": "string", "minLength": 2000}},
              "required": ["text"]}  # fmt: skip
    prompts = [[5 + (7 * i + t) % 900 for t in range(16)] for i in range(args.batch)]
    best: dict[str, float] = {}
    for repeat in range(args.repeats):
        for name, structured in (
            ("unconstrained", None),
            ("json_schema", ("json", json.dumps(schema))),
        ):
            seeds = [repeat * 1000 + i for i in range(args.batch)]
            params = [SamplingParams(max_tokens=args.tokens, temperature=1.0, seed=seed,
                                     ignore_eos=True, structured_output=structured)
                      for seed in seeds]  # fmt: skip
            steps = llm.engine.counters["steps"]
            start = time.perf_counter()
            outs = llm.generate(prompts, params)
            seconds = time.perf_counter() - start
            assert all(len(o.outputs[0].token_ids) == args.tokens for o in outs)
            per_step = seconds / (llm.engine.counters["steps"] - steps)
            best[name] = min(best.get(name, float("inf")), per_step)
    big = json.dumps(schema_of_size(2048))
    fresh = StructuredOutputs(llm.engine.tokenizer, llm.engine.model_config.vocab_size)
    fresh.matcher("json_object", "")  # builds the compiler (the vocabulary), once per engine
    start = time.perf_counter()
    fresh.matcher("json", big)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    fresh.matcher("json", big)
    cached_s = time.perf_counter() - start
    return {
        "machine": machine(), "preset": args.preset, "batch": args.batch, "tokens": args.tokens,
        "step_s": best, "overhead": best["json_schema"] / best["unconstrained"] - 1,
        "schema_chars": len(big), "compile_s": compile_s, "compile_cached_s": cached_s,
    }  # fmt: skip


def report(results: dict[str, Any]) -> None:
    steps = results["step_s"]
    rows = [[name, fmt(s * 1e3)] for name, s in steps.items()]
    print_table(f"time per step, batch {results['batch']}", ["run", "ms/step"], rows)
    print(f"grammar overhead per step: {results['overhead']:+.1%}")
    print(
        f"compile of a {results['schema_chars']}-char schema: "
        f"{results['compile_s'] * 1e3:.1f} ms, cached {results['compile_cached_s'] * 1e3:.2f} ms"
    )


def main(argv: Sequence[str] | None = None) -> int:
    return run_benchmark(argv, parse_args, run, report)


if __name__ == "__main__":
    raise SystemExit(main())
