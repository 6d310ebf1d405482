"""Shared by the benchmarks: checkpoints, the roofline, the trace and its `transformers` baseline,
statistics and reports."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import platform
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workers.model.make_model import SPECIAL_TOKENS, make_model

MODEL_CACHE = Path(tempfile.gettempdir()) / "manta-bench-models"


# -- checkpoints and the roofline ---------------------------------------------------------------
def checkpoint(preset: str, cache_dir: Path = MODEL_CACHE, seed: int = 0, **overrides: Any) -> Path:
    """A random Llama checkpoint of ``preset``, built once and reused from ``cache_dir``;
    ``overrides`` go into its config (``initializer_range=0.1``: weights peaked enough that
    greedy choices never hinge on floating-point rounding, so batching changes no text)."""
    suffix = "".join(f"-{k}{v}" for k, v in sorted(overrides.items()))
    path = cache_dir / f"{preset}-llama-seed{seed}{suffix}"
    if (path / "config.json").is_file():
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Built aside and renamed, so an interrupted build never leaves a half-written checkpoint.
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=cache_dir))
    try:
        make_model(staging, preset, "llama", seed=seed, **overrides)
        staging.rename(path)
    except OSError:
        if not (path / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def matmul_flops_rate(size: int = 2048, repeats: int = 5) -> float:
    """The machine's float32 matmul rate in FLOP/s: the best of ``repeats`` square products,
    through torch's default matmul and through the model's own (oneDNN on the CPU, about twice
    as fast on these cores), whichever is faster: the roofline is what the cores can do."""
    from workers.model.linear import linear

    a = torch.randn(size, size)
    b = torch.randn(size, size)
    out = torch.empty(size, size)
    best = math.inf
    for matmul in (lambda: torch.mm(a, b, out=out), lambda: linear(a, b)):
        matmul()  # warm-up: thread pool, caches, oneDNN's kernel for this shape
        for _ in range(repeats):
            start = time.perf_counter()
            matmul()
            best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def attention_flops(q_size: int, num_layers: int, start: int, end: int) -> int:
    """FLOPs of QK^T and PV for the queries at positions ``[start, end)``, causal context only.

    The query at position p meets p + 1 keys: 2 * (p + 1) * q_size FLOPs for the scores and as
    many for the weighted values, in every layer.
    """
    pairs = (end * (end + 1) - start * (start + 1)) // 2
    return 4 * q_size * num_layers * pairs


# -- traces ------------------------------------------------------------------------------------
@dataclasses.dataclass(slots=True)
class TraceSpec:
    """A seeded shared-prefix trace: its size, prompt shape, output lengths and arrivals."""

    num_requests: int = 200
    output_len: tuple[int, int] = (32, 64)  # fixed per request, drawn uniformly
    system_len: int = 256
    rate: float = 4.0  # Poisson arrivals, requests per second
    burst: int = 50  # requests that arrive together, a third of the way in
    seed: int = 0


@dataclasses.dataclass(slots=True)
class TraceRequest:
    arrival_s: float
    prompt_ids: list[int]
    max_tokens: int


@dataclasses.dataclass(slots=True)
class Replay:
    """What one system did with the trace: per-request times (from arrival) and outputs."""

    ttft_s: list[float]
    latency_s: list[float]
    outputs: list[list[int]]
    kv_bytes: list[float]
    makespan_s: float
    cpu_s: float
    extra: dict[str, float] = dataclasses.field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        num_tokens = sum(len(tokens) for tokens in self.outputs)
        return {
            "output_tokens_per_s": num_tokens / self.makespan_s,
            "requests_per_s": len(self.outputs) / self.makespan_s,
            "ttft_p50_s": percentile(self.ttft_s, 50),
            "ttft_p99_s": percentile(self.ttft_s, 99),
            "latency_p50_s": percentile(self.latency_s, 50),
            "latency_p99_s": percentile(self.latency_s, 99),
            "kv_bytes_per_request": statistics.fmean(self.kv_bytes),
            "cpu_s_per_m_output_tokens": self.cpu_s / num_tokens * 1e6,
            "makespan_s": self.makespan_s,
            "output_tokens": num_tokens,
            **self.extra,
        }


def random_ids(rng: random.Random, vocab_size: int, n: int) -> list[int]:
    """``n`` ordinary token ids (the special tokens take the top of the vocabulary)."""
    top = vocab_size - len(SPECIAL_TOKENS)
    return [rng.randrange(top) for _ in range(n)]


def make_trace(spec: TraceSpec, vocab_size: int) -> list[TraceRequest]:
    """Half the prompts are the system prompt plus 8-32 tokens, half 32-288 tokens of their own.

    Arrivals are Poisson except for ``burst`` requests that come with the arrival a third of
    the way in; the first arrival is at time 0.
    """
    rng = random.Random(spec.seed)
    n, burst = spec.num_requests, spec.burst
    system = random_ids(rng, vocab_size, spec.system_len)
    shared = set(rng.sample(range(n), n // 2))
    arrivals = list(itertools.accumulate(rng.expovariate(spec.rate) for _ in range(n - burst)))
    burst_at = arrivals[len(arrivals) // 3] if arrivals else 0.0
    arrivals = sorted(arrivals + [burst_at] * burst)
    trace = []
    for i, arrival in enumerate(arrivals):
        if i in shared:
            prompt = system + random_ids(rng, vocab_size, rng.randint(8, 32))
        else:
            prompt = random_ids(rng, vocab_size, rng.randint(32, 288))
        trace.append(TraceRequest(arrival - arrivals[0], prompt, rng.randint(*spec.output_len)))
    return trace


def replay_transformers(
    model_dir: str | Path, trace: list[TraceRequest], batch_size: int = 8
) -> Replay:
    """`generate` over static, left-padded batches in arrival order, default cache.

    A batch starts once its last request has arrived and the previous batch is done; it runs
    for its longest request (end-of-sequence disabled) and each row keeps its own length.
    KV bytes per request are the padded cache rows: (batch width + new tokens - 1) tokens.
    """
    from transformers import AutoModelForCausalLM
    from transformers.generation import BaseStreamer

    class FirstTokenClock(BaseStreamer):
        """`generate` puts the prompt first, then each step's tokens: time the second put."""

        def __init__(self) -> None:
            self.puts = 0
            self.time = math.nan

        def put(self, value: torch.Tensor) -> None:
            self.puts += 1
            if self.puts == 2:
                self.time = time.perf_counter()

        def end(self) -> None:
            """Nothing to flush."""

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # every row runs to max_new_tokens
    config = model.config
    pad_id = config.pad_token_id or 0  # masked out, so any id will do
    kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
    kv_per_token *= torch.float32.itemsize

    def generate(batch: Sequence[TraceRequest], clock: BaseStreamer | None) -> torch.Tensor:
        width = max(len(r.prompt_ids) for r in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, request in enumerate(batch):
            ids[row, width - len(request.prompt_ids) :] = torch.tensor(request.prompt_ids)
            mask[row, width - len(request.prompt_ids) :] = 1
        new = max(r.max_tokens for r in batch)
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=new,
                do_sample=False,
                pad_token_id=pad_id,
                streamer=clock,
            )
        return out[:, width:]

    generate(trace[:2], None)  # warm-up
    n = len(trace)
    ttft, latency, kv_bytes = [math.nan] * n, [math.nan] * n, [0.0] * n
    outputs: list[list[int]] = [[] for _ in trace]
    real_tokens = padded_slots = 0
    start, cpu_start = time.perf_counter(), time.process_time()
    for first in range(0, n, batch_size):
        batch = trace[first : first + batch_size]
        wait = batch[-1].arrival_s - (time.perf_counter() - start)
        if wait > 0:
            time.sleep(wait)
        clock = FirstTokenClock()
        generated = generate(batch, clock)
        end = time.perf_counter() - start
        width = max(len(r.prompt_ids) for r in batch) + generated.shape[1] - 1
        for row, request in enumerate(batch):
            i = first + row
            outputs[i] = generated[row, : request.max_tokens].tolist()
            ttft[i] = clock.time - start - request.arrival_s
            latency[i] = end - request.arrival_s
            kv_bytes[i] = width * kv_per_token
            real_tokens += len(request.prompt_ids) + request.max_tokens - 1
        padded_slots += len(batch) * width
    return Replay(
        ttft_s=ttft,
        latency_s=latency,
        outputs=outputs,
        kv_bytes=kv_bytes,
        makespan_s=time.perf_counter() - start,
        cpu_s=time.process_time() - cpu_start,
        extra={"pool_utilization": real_tokens / padded_slots},
    )


# -- statistics and reports --------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), linearly interpolated."""
    if not values:
        raise ValueError("percentile of no values")
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_1m": os.getloadavg()[0],
    }


def matmul_gflops(seconds: float = 0.3, size: int = 512) -> float:
    """This machine's float32 matrix-product speed now, on torch's threads: a shared
    machine's speed drifts, and a figure measured beside each timed run shows by how much."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm
    count, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        a @ b
        count += 1
    return 2 * size**3 * count / elapsed / 1e9


def fmt(value: float) -> str:
    """A number in a table cell: three significant digits, thousands grouped."""
    if value != 0 and (abs(value) >= 1e7 or abs(value) < 1e-3):
        return f"{value:.3g}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Print a left-aligned text table under ``title``."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    print(f"\n{title}\n{line}")
    print("  ".join(str(cell).ljust(w) for cell, w in zip(header, widths)).rstrip())
    print(line)
    for row in rows:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip())
    print(line)


def write_json(path: str | Path, data: dict[str, Any]) -> Path:
    """Write ``data`` as indented JSON, creating the parent folder."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return out


def run_benchmark(argv, parse_args, run, report) -> int:
    """The `main` of every benchmark: parse, run, print the table, write the JSON."""
    args = parse_args(argv)
    results = run(args)
    report(results)
    print(f"\nwrote {write_json(args.out, results)}")
    return 0


async def sse_lines(response) -> AsyncIterator[str]:
    """The lines of a streamed (SSE) httpx response, split on "\n" only, as SSE does.
    httpx's `aiter_lines` splits as `str.splitlines` does, also on U+2028, U+0085 and other
    characters that a completion's text may hold raw inside a JSON line."""
    buffered = b""
    async for piece in response.aiter_bytes():
        buffered += piece
        *lines, buffered = buffered.split(b"\n")
        for line in lines:
            yield line.rstrip(b"\r").decode()
    if buffered:
        yield buffered.decode()
