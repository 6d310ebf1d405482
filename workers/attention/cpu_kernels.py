"""The CPU paged-attention kernel (cpu_paged_attention.c): built once per machine, called
through ctypes.

Gathering every sequence's blocks into a contiguous copy each layer, as the pure-torch path
does, moves the whole context through memory three times (read, write, read again); the
kernel reads it once, in place. It is plain C with OpenMP, compiled with the machine's C
compiler (`cc`, or `$CC`) for this CPU, and shares torch's OpenMP thread pool (the same
libgomp is already loaded). When no compiler is available the backend falls back to the
torch path, with one warning.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_paged_attention.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-fno-math-errno")


def _cache_dir() -> Path:
    root = os.environ.get("MANTA_KERNEL_CACHE") or Path.home() / ".cache" / "manta" / "kernels"
    return Path(root)


def _cpu_flags() -> str:
    """This CPU's feature flags: a kernel built for one CPU (-march=native) may not run on
    another, so they key the cache as well."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            return next((line for line in info if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _build(compiler: str) -> Path:
    """Compile the kernel (once per source, flags, compiler and CPU) into the cache directory."""
    source = SOURCE.read_bytes()
    identity = " ".join((compiler, *FLAGS, _cpu_flags()))
    key = hashlib.sha256(source + identity.encode()).hexdigest()[:16]
    target = _cache_dir() / f"cpu_paged_attention-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built aside and renamed: processes that build at once never load a half-written file.
    fd, staging = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run(
            [compiler, *FLAGS, str(SOURCE), "-o", staging, "-lm"],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
        os.replace(staging, target)
    finally:
        if os.path.exists(staging):
            os.unlink(staging)
    return target


@cache
def _kernel():
    """The loaded kernel function, or None if it cannot be built here."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.warning("no C compiler found: CPU attention uses the slower torch path")
        return None
    try:
        library = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", "") or error
        logger.warning("CPU attention kernel unavailable (%s): using the torch path", detail)
        return None
    fn = library.manta_paged_attention_f32
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ptr, i64, i64, ptr, ptr, ptr, i64, ptr, ptr, ptr, i64, ptr, i64, i64]
    fn.argtypes += [i64, i64, i64, i64, ctypes.c_float, i64, i64]
    fn.restype = ctypes.c_int
    return fn


def available() -> bool:
    return _kernel() is not None


def paged_attention(
    query: torch.Tensor,  # [T, num_heads, head_dim] float32, head_dim contiguous
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], contiguous
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int64, rows contiguous
    query_start_loc: torch.Tensor,  # [B + 1] int64
    seq_lens: torch.Tensor,  # [B] int64
    seqs: torch.Tensor,  # [S] int64: which sequences to compute
    out: torch.Tensor,  # [T, num_heads, head_dim] float32, written for the chosen sequences
    scale: float,
    sliding_window: int | None,
) -> None:
    """Causal attention of the chosen sequences' query tokens over their paged contexts."""
    fn = _kernel()
    if fn is None:
        raise RuntimeError("the CPU attention kernel is not available (no C compiler)")
    for name, t in (("query", query), ("key_cache", key_cache), ("value_cache", value_cache)):
        if t.dtype != torch.float32 or t.device.type != "cpu" or t.stride(-1) != 1:
            raise ValueError(f"{name} must be a float32 CPU tensor with contiguous head_dim")
    if not (key_cache.is_contiguous() and value_cache.is_contiguous()):
        raise ValueError("the KV caches must be contiguous")
    for t in (block_tables, query_start_loc, seq_lens, seqs):
        if t.dtype != torch.int64 or t.stride(-1) != 1:
            raise ValueError("block tables, query starts, sequence lengths must be int64")
    _, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    status = fn(
        query.data_ptr(),
        query.stride(0),
        query.stride(1),
        key_cache.data_ptr(),
        value_cache.data_ptr(),
        block_tables.data_ptr(),
        block_tables.stride(0),
        query_start_loc.data_ptr(),
        seq_lens.data_ptr(),
        seqs.data_ptr(),
        seqs.numel(),
        out.data_ptr(),
        out.stride(0),
        out.stride(1),
        num_heads,
        num_kv_heads,
        head_dim,
        block_size,
        scale,
        sliding_window or 0,
        torch.get_num_threads(),
    )
    if status != 0:
        raise MemoryError("the CPU attention kernel could not allocate its scratch memory")
