"""The GPU check: one prepared run on a GPU machine, for what a CPU cannot measure.

Four sections, each recorded even when another fails (its error is written in its place):
  kernels    Triton paged attention, and flash-attention when a build is installed, against
             the torch reference on a mixed batch (prefills over cached prefixes, a whole
             prefill, decodes, verification rows), bf16, GQA 4, head_dim 128, with and without
             a sliding window: max abs error of the output, and of the cache writes.
  bandwidth  decode attention (one query per sequence, Llama-3-8B heads) at batch 1/16/128 x
             context 1k/8k/32k: GB/s of K/V read, against this run's device-to-device copy.
  engine     output tok/s of `workers.LLM` on random Llama-3.2-1B- and Llama-3.1-8B-shaped
             checkpoints, with CUDA graphs and without; decode time per step against the
             weight-read bound, and decode FLOP/s against the bf16 matmul peak, both measured
             in this run.
  greedy     Manta's greedy tokens against `transformers` generate on the 1B-shaped model.

    python benchmarks/gpu_check.py --out DIR [--sections kernels,bandwidth,engine,greedy]
        [--wheels DIR] [--work-dir DIR] [--time-budget-s S] [--cpu-smoke]

Needs torch, triton, transformers, safetensors, tokenizers, numpy and xxhash, plus pydantic and
jinja2 for the engine (`--wheels DIR` installs those from wheels when they are missing).
`--cpu-smoke` runs the same code at tiny shapes on the CPU, Triton under its interpreter, so the
script is known to start (tests/test_gpu_check.py). Sized for under eight minutes on an H200:
no item starts once --time-budget-s (360 s) has passed. Prints one markdown table; writes
DIR/gpu_check.json (a key per section, each with its settings and `rows`; a failed row or section
holds `error` instead of numbers) after every section, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import itertools
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

START = time.perf_counter()
# Run as a script from the repository root: the engine's packages live beside this folder. The
# engine is imported inside the functions, once TRITON_INTERPRET and the wheels are in place.
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

SECTIONS = ("kernels", "bandwidth", "engine", "greedy")
Save = Callable[[dict[str, Any]], None]  # writes a section's results so far into the JSON
FORBIDDEN_MODULES = ("ray", "redis", "fastapi")  # the engine's import path must not need them
ENGINE_PACKAGES = ("pydantic", "jinja2")
TOKENIZER_VOCAB = 1024  # model ids above it decode to no text: text is not measured here
KERNEL_TOLERANCE = 2e-2  # bf16: |out - ref| <= tol * (1 + |ref|)
TARGETS = {  # (section, row key) -> (field, least value)
    ("bandwidth", (128, 8192)): ("copy_fraction", 0.7),
    ("engine", ("llama-8b", True, 1)): ("weight_bound_fraction", 0.8),
    ("engine", ("llama-1b", True, 256)): ("matmul_peak_fraction", 0.4),
}


def llama3_rope(factor: float, original: int) -> dict[str, Any]:
    scaling = dict(rope_type="llama3", factor=factor, low_freq_factor=1.0, high_freq_factor=4.0)
    return dict(
        rope_theta=500000.0, rope_scaling=scaling | {"original_max_position_embeddings": original}
    )


LLAMA_1B = dict(
    hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
    max_position_embeddings=131072, **llama3_rope(32.0, 8192),
)  # fmt: skip
LLAMA_8B = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False,
    max_position_embeddings=131072, **llama3_rope(8.0, 8192),
)  # fmt: skip
TINY = dict(  # the 1B model's features (tied embeddings, llama3 rope) at make_model's tiny size
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, vocab_size=TOKENIZER_VOCAB, tie_word_embeddings=True,
    max_position_embeddings=2048, **llama3_rope(8.0, 256),
)  # fmt: skip


@dataclasses.dataclass(frozen=True, slots=True)
class ModelSpec:
    """A random checkpoint to build, and the batch sizes the engine section decodes on it."""

    name: str
    shape: dict[str, Any]  # config.json fields
    batches: tuple[int, ...]
    max_num_seqs: int
    init_std: float = 0.05  # logits peaked enough that bf16 near-ties are rare in greedy


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    """Sizes of one run: the GPU's, or `--cpu-smoke`'s tiny ones on the CPU."""

    device: str
    engine_dtype: str
    kernel_heads: tuple[int, int, int]  # query heads, KV heads, head_dim
    kernel_context: int  # the longest context in the kernel check's batch
    kernel_window: int
    attn_heads: tuple[int, int, int]
    attn_batches: tuple[int, ...]
    attn_contexts: tuple[int, ...]
    warmup: int
    repeats: int
    copy_elements: int  # of a bf16 tensor
    matmul_size: int
    matmul_dtype: str
    models: tuple[ModelSpec, ...]  # the first is also the greedy check's
    engine_backends: tuple[str, ...]
    prompt_len: int
    output_len: int
    kv_cache_bytes: int
    max_model_len: int
    greedy_prompts: int
    greedy_steps: int
    time_budget_s: float


GPU_PLAN = Plan(
    device="cuda", engine_dtype="bfloat16",
    kernel_heads=(32, 8, 128), kernel_context=2048, kernel_window=128,
    attn_heads=(32, 8, 128), attn_batches=(1, 16, 128), attn_contexts=(1024, 8192, 32768),
    warmup=3, repeats=20, copy_elements=2**30, matmul_size=8192, matmul_dtype="bfloat16",
    models=(
        ModelSpec("llama-1b", LLAMA_1B, (1, 16, 64, 256), max_num_seqs=256),
        ModelSpec("llama-8b", LLAMA_8B, (1, 64), max_num_seqs=64),
    ),
    engine_backends=("auto",), prompt_len=128, output_len=64,
    kv_cache_bytes=8 * 2**30, max_model_len=1024,
    greedy_prompts=4, greedy_steps=32, time_budget_s=360.0,
)  # fmt: skip
SMOKE_PLAN = Plan(
    device="cpu", engine_dtype="float32",
    kernel_heads=(8, 2, 128), kernel_context=80, kernel_window=16,
    attn_heads=(8, 2, 64), attn_batches=(1, 4), attn_contexts=(64, 256),
    warmup=1, repeats=3, copy_elements=2**23, matmul_size=256, matmul_dtype="float32",
    models=(ModelSpec("tiny", TINY, (1, 4), max_num_seqs=4, init_std=0.1),),
    engine_backends=("triton", "torch"), prompt_len=16, output_len=8,
    kv_cache_bytes=64 * 2**20, max_model_len=256,
    greedy_prompts=2, greedy_steps=8, time_budget_s=120.0,
)  # fmt: skip


class Deadline:
    """The run's time budget: once it is spent, later items are skipped, not started."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def check(self) -> None:
        if time.monotonic() > self.end:
            raise TimeoutError("skipped: time budget spent")


def failure(error: BaseException) -> dict[str, str]:
    """What the JSON records in place of a measurement: {"skipped": why} once the time budget
    is spent, else {"error": its type, message and the line that raised it}."""
    if isinstance(error, TimeoutError):
        return {"skipped": str(error)}
    frames = traceback.extract_tb(error.__traceback__)
    place = f" ({Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return {"error": f"{type(error).__name__}: {error}{place}"}


def attempt(row: dict[str, Any], measure: Callable[[], dict], deadline: Deadline) -> dict:
    """`row` with what `measure()` found, or with its error: one failure costs one row."""
    try:
        deadline.check()
        row.update(measure())
    except Exception as error:
        row.update(failure(error))
    return row


def apply_target(section: str, key: tuple, row: dict[str, Any]) -> dict[str, Any]:
    """Marks the rows that carry a target with it and whether they meet it."""
    if (section, key) in TARGETS and "error" not in row and "skipped" not in row:
        field, least = TARGETS[section, key]
        row["target"] = f"{field} >= {least:g}"
        row["meets_target"] = row.get(field) is not None and row[field] >= least
    return row


# -- setup --------------------------------------------------------------------------------------
def ensure_engine_packages(wheels: str | None, work_dir: Path) -> None:
    """pydantic and jinja2 (the engine imports them), from `--wheels DIR` when missing."""
    missing = [name for name in ENGINE_PACKAGES if importlib.util.find_spec(name) is None]
    if not missing:
        return
    if wheels is None:
        sys.exit(
            f"gpu_check: the engine needs {', '.join(missing)}, which is not installed here: "
            "pass --wheels DIR, a folder of wheels (pydantic, pydantic_core, annotated_types, "
            "typing_inspection, typing_extensions, jinja2, markupsafe), installed offline"
        )
    files = sorted(str(p) for p in Path(wheels).glob("*.whl"))
    if not files:
        sys.exit(f"gpu_check: --wheels {wheels} holds no *.whl files")
    # A folder of our own on sys.path: no write into (or refusal by) a system site-packages.
    target = work_dir / "site-packages"
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps"]
    subprocess.run([*pip, "--target", str(target), *files], check=True)
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()


def environment(plan: Plan) -> dict[str, Any]:
    """What the numbers were measured on."""
    import transformers
    import triton

    from workers.attention.flash_attn_backend import load_flash_attn

    transformers.utils.logging.disable_progress_bar()
    kernel = load_flash_attn()
    on_gpu = plan.device == "cuda"
    return {
        "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "flash_attn": None if kernel is None else kernel.varlen_func.__module__,
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "cpu_smoke": not on_gpu,
    }


def forbidden_imports() -> list[str]:
    """Those of ray, redis and fastapi that this process imported (none, or it is a bug)."""
    return sorted({name.split(".")[0] for name in sys.modules} & set(FORBIDDEN_MODULES))


# -- timing and the machine's ceilings --------------------------------------------------------
def median_seconds(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int):
    """Median time of `fn()`: CUDA events on a GPU, time.perf_counter on the CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            began = time.perf_counter()
            fn()
            times.append(time.perf_counter() - began)
    return statistics.median(times)


def baselines(plan: Plan, device: torch.device) -> dict[str, Any]:
    """The run's own ceilings: copy bandwidth (bytes read + written) and matmul FLOP/s."""
    src = torch.ones(plan.copy_elements, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    copy_s = median_seconds(lambda: dst.copy_(src), device, plan.warmup, plan.repeats)
    n, dtype = plan.matmul_size, getattr(torch, plan.matmul_dtype)
    a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
    out = torch.empty(n, n, dtype=dtype, device=device)
    mm_s = median_seconds(lambda: torch.mm(a, b, out=out), device, plan.warmup, plan.repeats)
    return {
        "copy_bytes_per_s": 2 * src.numel() * src.element_size() / copy_s,
        "copy_convention": "bytes read + bytes written per second",
        "matmul_flops_per_s": 2 * n**3 / mm_s,
        "matmul": f"{plan.matmul_dtype} torch.mm {n}x{n}x{n}",
    }


def free_device_memory(device: torch.device) -> int:
    """Bytes free on the device once dropped tensors are returned to it."""
    if device.type != "cuda":
        return 4 * 2**30  # the smoke run's shapes are far below this
    gc.collect()
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info(device)[0]


# -- 1. kernel correctness ----------------------------------------------------------------------
@dataclasses.dataclass
class AttentionCase:
    """One step's inputs over a filled cache; each run gets its own clone of the cache."""

    query_lens: list[int]
    seq_lens: list[int]
    block_tables: list[list[int]]
    block_size: int
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    cache: torch.Tensor  # [2, num_blocks, block_size, kv_heads, head_dim]

    def metadata(self):
        from workers.attention.base import AttentionMetadata

        return AttentionMetadata.build(
            self.query_lens, self.seq_lens, self.block_tables, self.block_size, self.cache.device
        )

    def run(self, backend, window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(output, cache after the step's writes) of `backend`."""
        cache, scale = self.cache.clone(), self.query.shape[-1] ** -0.5
        meta = self.metadata()
        out = backend.forward(self.query, self.key, self.value, cache, meta, scale, window)
        return out, cache


def make_case(
    query_lens: list[int],
    seq_lens: list[int],
    heads: tuple[int, int, int],
    block_size: int,
    device: torch.device,
) -> AttentionCase:
    """Random bf16 queries, keys, values and cache; each sequence's blocks scattered."""
    num_heads, kv_heads, head_dim = heads
    counts = [-(-s // block_size) for s in seq_lens]
    gen = torch.Generator().manual_seed(sum(seq_lens))
    order = torch.randperm(sum(counts) + 1, generator=gen).tolist()  # one block never used
    starts = [sum(counts[:i]) for i in range(len(counts))]
    tables = [order[start : start + n] for start, n in zip(starts, counts)]
    tokens, dtype = sum(query_lens), torch.bfloat16
    shape = (2, len(order), block_size, kv_heads, head_dim)
    return AttentionCase(
        query_lens,
        seq_lens,
        tables,
        block_size,
        torch.randn(tokens, num_heads, head_dim, dtype=dtype, device=device),
        torch.randn(tokens, kv_heads, head_dim, dtype=dtype, device=device),
        torch.randn(tokens, kv_heads, head_dim, dtype=dtype, device=device),
        torch.empty(shape, dtype=dtype, device=device).normal_(),
    )


def mixed_lens(context: int) -> tuple[list[int], list[int]]:
    """(query_lens, seq_lens): prefills over cached prefixes, a whole prefill, decodes (one of
    a single token), and speculative verification rows, contexts up to `context`."""
    c = context
    query_lens = [c // 4, c // 8 + 3, 1, 1, 1, 1, 5, 4]
    seq_lens = [c // 2 + 7, c // 8 + 3, c, c // 3 + 1, 17, 1, c // 2 + 5, 40]
    return query_lens, seq_lens


def kernel_backends(plan: Plan) -> list[tuple[str, Callable[[], object] | None, int, str]]:
    """(name, factory or None, block size, why it is skipped) of each backend to check."""
    from workers.attention.flash_attn_backend import FlashAttnBackend, load_flash_attn
    from workers.attention.triton_backend import TritonAttentionBackend

    found = [("triton", TritonAttentionBackend, 16, "")]
    kernel = load_flash_attn()
    if kernel is None or plan.device != "cuda":
        why = "not installed" if kernel is None else "no CUDA"
        found.append(("flash_attn", None, 0, f"skipped: flash-attn {why}"))
    else:  # vLLM's build pages by 16 tokens, upstream's by 256
        size = kernel.block_multiple
        found.append(("flash_attn", lambda: FlashAttnBackend(kernel, size), size, ""))
    return found


def kernel_errors(case: AttentionCase, factory, reference, window: int | None) -> dict:
    """How far a backend's output and cache writes are from the reference's."""
    expected, expected_cache = case.run(reference, window)
    out, cache = case.run(factory(), window)
    diff, expected = (out.float() - expected.float()).abs(), expected.float().abs()
    cache_error = (cache.float() - expected_cache.float()).abs().max().item()
    # atol + rtol * |ref|: one bf16 ulp of an output near 4 is already 0.03
    close = bool((diff <= KERNEL_TOLERANCE * (1 + expected)).all())
    return {
        "max_abs_err": diff.max().item(),
        "cache_max_abs_err": cache_error,
        "passed": close and cache_error == 0.0,
    }


def kernel_section(plan: Plan, device: torch.device, deadline: Deadline) -> dict[str, Any]:
    from workers.attention.torch_ref import TorchAttentionBackend

    reference = TorchAttentionBackend(native_kernel=False)
    query_lens, seq_lens = mixed_lens(plan.kernel_context)
    rows = []
    for name, factory, block_size, skipped in kernel_backends(plan):
        if factory is None:
            rows.append({"backend": name, "skipped": skipped})
            continue
        case = make_case(query_lens, seq_lens, plan.kernel_heads, block_size, device)
        for window in (None, plan.kernel_window):
            row = {"backend": name, "block_size": block_size, "window": window}
            measure = partial(kernel_errors, case, factory, reference, window)
            rows.append(attempt(row, measure, deadline))
    return {
        "dtype": "bfloat16",
        "heads": plan.kernel_heads,
        "query_lens": query_lens,
        "seq_lens": seq_lens,
        "tolerance": f"|out - ref| <= {KERNEL_TOLERANCE:g} * (1 + |ref|); cache writes exact",
        "rows": rows,
    }


# -- 2. decode attention bandwidth -------------------------------------------------------------
def decode_bandwidth(
    backend, block_size: int, plan: Plan, device: torch.device, batch: int, context: int
) -> dict[str, Any]:
    """K/V bytes read per second by one decode step of `batch` sequences of `context` tokens."""
    _, kv_heads, head_dim = plan.attn_heads
    kv_bytes = 2 * batch * context * kv_heads * head_dim * torch.bfloat16.itemsize
    if kv_bytes * 1.2 + 2**30 > free_device_memory(device):
        return {"skipped": f"skipped: needs {kv_bytes / 2**30:.1f} GiB of KV cache"}
    case = make_case([1] * batch, [context] * batch, plan.attn_heads, block_size, device)
    meta, scale = case.metadata(), head_dim**-0.5

    def step() -> None:
        backend.forward(case.query, case.key, case.value, case.cache, meta, scale)

    seconds = median_seconds(step, device, plan.warmup, plan.repeats)
    return {"kv_bytes": kv_bytes, "seconds": seconds, "bytes_per_s": kv_bytes / seconds}


def bandwidth_section(
    plan: Plan, device: torch.device, ceilings: dict[str, Any], deadline: Deadline
) -> dict[str, Any]:
    copy_bw = ceilings.get("copy_bytes_per_s")
    rows = []
    for name, factory, block_size, skipped in kernel_backends(plan):
        if factory is None:
            rows.append({"backend": name, "skipped": skipped})
            continue
        backend = factory()
        for batch in plan.attn_batches:
            for context in plan.attn_contexts:
                row = {"backend": name, "batch": batch, "context": context}
                measure = partial(decode_bandwidth, backend, block_size, plan, device)
                attempt(row, partial(measure, batch, context), deadline)
                if copy_bw and "bytes_per_s" in row:
                    row["copy_fraction"] = row["bytes_per_s"] / copy_bw
                rows.append(apply_target("bandwidth", (batch, context), row))
                free_device_memory(device)
    return {
        "heads": plan.attn_heads,
        "dtype": "bfloat16",
        "bytes": "K+V bytes read: sum(seq_lens) * kv_heads * head_dim * 2 * itemsize",
        "copy_bytes_per_s": copy_bw,
        "rows": rows,
    }


# -- 3. engine throughput -----------------------------------------------------------------------
def write_checkpoint(out: Path, spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> Path:
    """A random checkpoint in the Hugging Face layout, once: transformers initialises the model
    on the device and saves it; make_model's config and tokenizer code write the rest."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from workers.model.make_model import (
        BOS,
        EOT,
        IM_END,
        PAD,
        _write_tokenizer,
        build_tokenizer,
        make_config,
        special_token_id,
    )

    if (out / "config.json").is_file():
        return out
    ids = {
        "bos_token_id": special_token_id(BOS, TOKENIZER_VOCAB),
        "eos_token_id": [special_token_id(t, TOKENIZER_VOCAB) for t in (EOT, IM_END)],
        "pad_token_id": special_token_id(PAD, TOKENIZER_VOCAB),
    }
    config = make_config("tiny", "llama", "v5", {**spec.shape, **ids})
    config.update(initializer_range=spec.init_std, dtype=str(dtype).removeprefix("torch."))
    # Built aside and renamed, so a failed build never passes for a checkpoint.
    staging = out.with_name(f".{out.name}-staging")
    shutil.rmtree(staging, ignore_errors=True)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**config), dtype=dtype)
    model.save_pretrained(staging)
    del model
    free_device_memory(device)
    _write_tokenizer(staging, build_tokenizer(TOKENIZER_VOCAB), config, "v5")
    staging.rename(out)
    return out


def model_path(spec: ModelSpec, plan: Plan, work_dir: Path) -> Path:
    device, dtype = torch.device(plan.device), getattr(torch, plan.engine_dtype)
    return write_checkpoint(work_dir / spec.name, spec, device, dtype)


def build_once(spec: ModelSpec, plan: Plan, work_dir: Path, built: dict) -> Path:
    """The checkpoint of `spec`, built on first use; a build that failed is not retried."""
    if spec.name not in built:
        try:
            built[spec.name] = model_path(spec, plan, work_dir)
        except Exception as error:
            # A fresh exception, not this one: its frames would keep the model in memory.
            built[spec.name] = RuntimeError(f"no checkpoint: {error}")
            raise
    if isinstance(built[spec.name], Exception):
        raise built[spec.name]
    return built[spec.name]


def make_llm(path: Path, plan: Plan, max_num_seqs: int, backend: str, graphs: bool):
    from workers import LLM

    return LLM(
        str(path),
        device=plan.device,
        dtype=plan.engine_dtype,
        attention_backend=backend,
        enforce_eager=not graphs,
        max_num_seqs=max_num_seqs,
        max_model_len=plan.max_model_len,
        kv_cache_bytes=plan.kv_cache_bytes,
    )


def timed_generation(engine, prompts: list[list[int]], output_len: int) -> dict[str, Any]:
    """Runs `prompts` to `output_len` greedy tokens each. Decode counts only the steps in which
    every sequence decodes one token (no prefill in the step, none finished yet)."""
    from workers import SamplingParams

    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    for prompt in prompts:
        engine.add_request(prompt, params)
    batch, tokens, decode_s, decode_steps = len(prompts), 0, 0.0, 0
    start = time.perf_counter()
    while engine.has_unfinished():
        scheduled = engine.counters["scheduled_tokens"]
        step_start = time.perf_counter()
        deltas = engine.step()
        seconds = time.perf_counter() - step_start
        emitted = sum(len(d.new_token_ids) for d in deltas)
        tokens += emitted
        if engine.counters["scheduled_tokens"] - scheduled == emitted == batch:
            decode_s, decode_steps = decode_s + seconds, decode_steps + 1
    total = time.perf_counter() - start
    return {
        "output_tokens": tokens,
        "seconds": total,
        "output_tok_s": tokens / total,
        "decode_steps": decode_steps,
        "decode_tok_s": batch * decode_steps / decode_s if decode_steps else None,
        "decode_ms_per_step": 1e3 * decode_s / decode_steps if decode_steps else None,
    }


def weight_bytes_per_decode(model: torch.nn.Module) -> int:
    """Bytes of weights a decode step reads: all but an untied embedding (a row of it)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if model.lm_head is not None:
        total -= model.embed_tokens.weight.numel() * model.embed_tokens.weight.element_size()
    return total


def measure_batch(engine, batch: int, plan: Plan, ceilings: dict[str, Any]) -> dict[str, Any]:
    """A warm-up (this batch's prefill kernels), the timed run, and its share of the ceilings."""
    from benchmarks.common import random_ids

    rng = random.Random(batch)

    def prompts() -> list[list[int]]:  # fresh ones each run: no prefix-cache hits
        return [random_ids(rng, TOKENIZER_VOCAB, plan.prompt_len) for _ in range(batch)]

    timed_generation(engine, prompts(), 2)
    row = timed_generation(engine, prompts(), plan.output_len)
    weight_bytes = weight_bytes_per_decode(engine.model)
    copy_bw, peak = ceilings.get("copy_bytes_per_s"), ceilings.get("matmul_flops_per_s")
    step_ms, tok_s = row["decode_ms_per_step"], row["decode_tok_s"]
    bound_ms = 1e3 * weight_bytes / copy_bw if copy_bw else None
    flops = engine.model_config.matmul_flops_per_token()
    return row | {
        "weight_bytes": weight_bytes,
        "weight_bound_ms": bound_ms,
        "weight_bound_fraction": bound_ms / step_ms if bound_ms and step_ms else None,
        "matmul_peak_fraction": tok_s * flops / peak if peak and tok_s else None,
    }


def engine_rows(
    spec: ModelSpec,
    path: Path,
    plan: Plan,
    backend: str,
    graphs: bool,
    ceilings: dict[str, Any],
    deadline: Deadline,
) -> list[dict[str, Any]]:
    """One engine (built here, released at the end), every batch size of `spec`."""
    llm = make_llm(path, plan, spec.max_num_seqs, backend, graphs)
    try:
        name = llm.engine.attention.name
        rows = []
        for batch in spec.batches:
            row = {"model": spec.name, "backend": name, "cuda_graphs": graphs, "batch": batch}
            attempt(row, partial(measure_batch, llm.engine, batch, plan, ceilings), deadline)
            rows.append(apply_target("engine", (spec.name, graphs, batch), row))
        return rows
    finally:
        del llm
        free_device_memory(torch.device(plan.device))


def engine_section(
    plan: Plan,
    device: torch.device,
    ceilings: dict[str, Any],
    work_dir: Path,
    deadline: Deadline,
    save: Save,
) -> dict[str, Any]:
    """Every model with CUDA graphs first (the rows with targets), then without; the JSON is
    saved after each engine, since this section is most of the run."""
    on_gpu = device.type == "cuda"
    rows: list[dict[str, Any]] = []
    section = {
        "prompt_len": plan.prompt_len,
        "output_len": plan.output_len,
        "dtype": plan.engine_dtype,
        "weight_bound": "weight bytes read per decode step / copy bandwidth",
        "matmul_peak_fraction": "decode tok/s * matmul FLOPs per token / matmul peak",
        "rows": rows,
    }
    if not on_gpu:
        rows += [
            {"model": s.name, "cuda_graphs": True, "skipped": "skipped: no CUDA"}
            for s in plan.models
        ]
    built: dict[str, Path | Exception] = {}
    for graphs in (True, False) if on_gpu else (False,):
        for spec, backend in itertools.product(plan.models, plan.engine_backends):
            row = {"model": spec.name, "backend": backend, "cuda_graphs": graphs}
            try:
                deadline.check()
                path = build_once(spec, plan, work_dir, built)
                rows += engine_rows(spec, path, plan, backend, graphs, ceilings, deadline)
            except Exception as error:
                rows.append(row | failure(error))
            save(section)
    return section


# -- 4. greedy equality with transformers -----------------------------------------------------
def transformers_greedy(
    path: Path, prompts: list[list[int]], steps: int, plan: Plan
) -> list[tuple[list[int], list[torch.Tensor]]]:
    """(greedy tokens, each step's logits) of `transformers` generate, per prompt."""
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, plan.engine_dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(plan.device).eval()
    model.generation_config.eos_token_id = None  # every prompt runs all its steps
    results = []
    try:
        for prompt in prompts:
            ids = torch.tensor([prompt], device=plan.device)
            with torch.inference_mode():
                out = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=steps,
                    do_sample=False,
                    pad_token_id=model.config.pad_token_id,
                    output_logits=True,
                    return_dict_in_generate=True,
                )
            tokens = out.sequences[0, len(prompt) :].tolist()
            results.append((tokens, [step[0].float().cpu() for step in out.logits]))
    finally:
        del model
        free_device_memory(torch.device(plan.device))
    return results


def compare_greedy(ours: list[int], reference: list[int], logits: list[torch.Tensor]) -> dict:
    """The first step where the tokens differ, and by how much the reference's logits preferred
    its token there (a small gap: a bf16 near-tie, not a bug)."""
    first = next((i for i, (a, b) in enumerate(zip(ours, reference)) if a != b), None)
    if first is None and len(ours) != len(reference):
        first = min(len(ours), len(reference))
    row: dict[str, Any] = {"steps": len(reference), "first_divergence": first}
    row["matching_steps"] = len(reference) if first is None else first
    if first is not None and first < len(ours):
        step = logits[first]
        row["logit_gap_at_divergence"] = (step[reference[first]] - step[ours[first]]).item()
    return row


def greedy_section(plan: Plan, work_dir: Path, deadline: Deadline) -> dict[str, Any]:
    from benchmarks.common import random_ids
    from workers import SamplingParams

    spec = plan.models[0]
    deadline.check()
    path = model_path(spec, plan, work_dir)
    rng = random.Random(1)
    n = plan.greedy_prompts
    prompts = [random_ids(rng, TOKENIZER_VOCAB, rng.randint(16, 64)) for _ in range(n)]
    params = SamplingParams(max_tokens=plan.greedy_steps, temperature=0.0, ignore_eos=True)
    llm = make_llm(path, plan, n, "auto", graphs=True)
    try:
        ours = [out.outputs[0].token_ids for out in llm.generate(prompts, params)]
        backend = llm.engine.attention.name
    finally:
        del llm
        free_device_memory(torch.device(plan.device))
    reference = transformers_greedy(path, prompts, plan.greedy_steps, plan)
    rows = [
        {"prompt_len": len(prompt), **compare_greedy(mine, tokens, logits)}
        for prompt, mine, (tokens, logits) in zip(prompts, ours, reference)
    ]
    return {
        "model": spec.name,
        "backend": backend,
        "dtype": plan.engine_dtype,
        "equal_prompts": sum(r["first_divergence"] is None for r in rows),
        "rows": rows,
    }


# -- the run and its report ---------------------------------------------------------------------
def run_section(results: dict[str, Any], name: str, job: Callable[[Save], dict], out: Path):
    """Runs one section into `results[name]` (its error instead, if it raises) and saves the
    JSON after it, and whenever the section saves what it has so far."""
    from benchmarks.common import write_json

    began = time.perf_counter()

    def save(section: dict[str, Any]) -> None:
        results[name] = section | {"elapsed_s": time.perf_counter() - began}
        results["elapsed_s"] = time.perf_counter() - START
        write_json(out, results)

    print(f"gpu_check: {name} ...", flush=True)
    try:
        section = job(save)
    except Exception as error:
        traceback.print_exc()
        section = failure(error)
    save(section)


def run(args: argparse.Namespace, plan: Plan, work_dir: Path) -> dict[str, Any]:
    device = torch.device(plan.device)
    deadline = Deadline(args.time_budget_s or plan.time_budget_s)
    out = Path(args.out) / "gpu_check.json"
    results: dict[str, Any] = {"sections": args.sections}
    run_section(results, "environment", lambda save: environment(plan), out)
    if {"bandwidth", "engine"} & set(args.sections):
        run_section(results, "baselines", lambda save: baselines(plan, device), out)
    ceilings = results.get("baselines", {})
    jobs: dict[str, Callable[[Save], dict]] = {
        "kernels": lambda save: kernel_section(plan, device, deadline),
        "bandwidth": lambda save: bandwidth_section(plan, device, ceilings, deadline),
        # greedy before engine: it is short, and the engine's 8B model is the longest part
        "greedy": lambda save: greedy_section(plan, work_dir, deadline),
        "engine": lambda save: engine_section(plan, device, ceilings, work_dir, deadline, save),
    }
    for name, job in jobs.items():
        if name in args.sections:
            run_section(results, name, job, out)
    run_section(results, "imports", lambda save: {"forbidden": forbidden_imports()}, out)
    return results


def num(value: float | None, scale: float = 1.0, unit: str = "") -> str:
    from benchmarks.common import fmt

    return "n/a" if value is None else f"{fmt(value * scale)}{unit}"


def row_label(name: str, row: dict[str, Any]) -> str:
    if name == "engine":
        graphs = "graphs" if row.get("cuda_graphs") else "eager"
        batch = f"batch {row['batch']}" if "batch" in row else ""
        return " ".join(filter(None, [row["model"], row.get("backend"), graphs, batch]))
    if name == "greedy":
        return f"prompt of {row['prompt_len']} tokens"
    keys = ("block_size", "window") if name == "kernels" else ("batch", "context")
    return " ".join([row["backend"], *(f"{key} {row[key]}" for key in keys if key in row)])


def row_result(name: str, row: dict[str, Any]) -> str:
    if name == "kernels":
        return f"max err {num(row['max_abs_err'])}, cache err {num(row['cache_max_abs_err'])}"
    if name == "bandwidth":
        fraction = num(row.get("copy_fraction"))
        return f"{num(row['bytes_per_s'], 1e-9, ' GB/s')} = {fraction} of copy"
    if name == "engine":
        return (
            f"{num(row['output_tok_s'])} tok/s out, {num(row['decode_tok_s'])} tok/s decode, "
            f"{num(row['decode_ms_per_step'], unit=' ms')}/step = "
            f"{num(row['weight_bound_fraction'])} of weight bound, "
            f"{num(row['matmul_peak_fraction'])} of mm peak"
        )
    first = row["first_divergence"]
    result = f"{row['matching_steps']}/{row['steps']} steps match"
    if first is not None:
        result += f", first divergence at step {first}"
        result += f" (logit gap {num(row.get('logit_gap_at_divergence'))})"
    return result


def table_row(name: str, row: dict[str, Any]) -> list[str]:
    """section | case | result | target | status"""
    label = row_label(name, row)
    if "error" in row:
        return [name, label, row["error"], "-", "ERROR"]
    if "skipped" in row:
        return [name, label, row["skipped"], "-", "-"]
    if name == "kernels":
        target, met = f"<= {KERNEL_TOLERANCE:g} * (1 + abs ref)", row["passed"]
    else:
        target, met = row.get("target", "-"), row.get("meets_target")
    status = "-" if met is None else ("pass" if met else "FAIL")
    return [name, label, row_result(name, row), target, status]


def report_rows(results: dict[str, Any]) -> list[list[str]]:
    """The table: the ceilings, then every row of every section that ran."""
    rows = []
    for name in ("baselines", *SECTIONS):
        section = results.get(name)
        if section is None:
            continue
        if "error" in section:
            rows.append([name, "section", section["error"], "-", "ERROR"])
        elif "skipped" in section:
            rows.append([name, "section", section["skipped"], "-", "-"])
        elif name == "baselines":
            copy = num(section["copy_bytes_per_s"], 1e-9, " GB/s (read + write)")
            peak = num(section["matmul_flops_per_s"], 1e-12, " TFLOP/s")
            rows.append([name, "device-to-device copy", copy, "-", "-"])
            rows.append([name, section["matmul"], peak, "-", "-"])
        else:
            rows += [table_row(name, row) for row in section["rows"]]
    if "greedy" in results and "rows" in results["greedy"]:
        greedy = results["greedy"]
        equal = f"{greedy['equal_prompts']}/{len(greedy['rows'])} prompts identical"
        rows.append(["greedy", f"{greedy['model']} vs transformers", equal, "-", "-"])
    return rows


def print_report(results: dict[str, Any]) -> None:
    env = results.get("environment", {})
    print(
        f"\n## GPU check: {env.get('device')}, torch {env.get('torch')}, triton "
        f"{env.get('triton')}, flash-attn {env.get('flash_attn')}\n"
    )
    header = ["section", "case", "result", "target", "status"]
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for row in report_rows(results):
        print("| " + " | ".join(str(cell).replace("|", "/") for cell in row) + " |")
    print(f"\nimports of {', '.join(FORBIDDEN_MODULES)}: {results['imports'].get('forbidden')}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--out", required=True, help="folder for gpu_check.json")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset")
    parser.add_argument("--wheels", help="folder of pydantic and jinja2 wheels, if missing")
    parser.add_argument("--work-dir", help="where checkpoints go (default: a temp dir, removed)")
    parser.add_argument("--time-budget-s", type=float, help="start no item after this long")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU")
    args = parser.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = SMOKE_PLAN if args.cpu_smoke else GPU_PLAN
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # read when triton is imported, by the engine
    elif not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here; --cpu-smoke tries the script on the CPU")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the GPU machine reaches no network
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="manta-gpu-check-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    try:
        ensure_engine_packages(args.wheels, work_dir)
        results = run(args, plan, work_dir)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)
    print_report(results)
    print(f"wrote {Path(args.out) / 'gpu_check.json'} in {results['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
