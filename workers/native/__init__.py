"""Small C kernels for the CPU path: built once per machine, loaded through ctypes.

Each kernel is a plain C file with OpenMP in this folder (sharing fast_math.h); the Python
module that calls it declares its signature. It is compiled with the machine's C compiler
(`$CC`, else `cc` or `gcc`) for this very CPU (-march=native) into a cache directory
(`$MANTA_KERNEL_CACHE`, default ~/.cache/manta/kernels), keyed by source, headers, flags,
compiler and CPU features, and shares torch's OpenMP runtime (the same libgomp is already
loaded). Without a compiler the callers keep their torch paths, after one warning naming the
fix.
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

logger = logging.getLogger(__name__)

SOURCES = Path(__file__).parent
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-fno-math-errno")


def _cache_dir() -> Path:
    root = os.environ.get("MANTA_KERNEL_CACHE") or Path.home() / ".cache" / "manta" / "kernels"
    return Path(root)


def _cpu_flags() -> str:
    """This CPU's feature flags: code built for one CPU may not run on another."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            return next((line for line in info if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _build(source: Path, compiler: str) -> Path:
    """Compile ``source`` into the cache directory unless an identical build is there."""
    identity = " ".join((compiler, *FLAGS, _cpu_flags())).encode()
    text = source.read_bytes() + b"".join(h.read_bytes() for h in sorted(SOURCES.glob("*.h")))
    key = hashlib.sha256(text + identity).hexdigest()[:16]
    target = _cache_dir() / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built aside and renamed: processes that build at once never load a half-written file.
    fd, staging = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run(
            [compiler, *FLAGS, f"-I{SOURCES}", str(source), "-o", staging, "-lm"],
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
def load(name: str) -> ctypes.CDLL | None:
    """The compiled library of this folder's ``name`` (a .c file), or None (with a warning)
    if it cannot be built here."""
    source = SOURCES / name
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.warning("no C compiler found (install gcc): %s runs on slower torch ops", source)
        return None
    try:
        return ctypes.CDLL(str(_build(source, compiler)))
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", "") or error
        logger.warning("could not build %s (%s): using torch ops instead", source.name, detail)
        return None


def declare(library: ctypes.CDLL, name: str, argtypes: list, restype=None):
    """A function of ``library`` with its C signature set."""
    fn = getattr(library, name)
    fn.argtypes = argtypes
    fn.restype = restype
    return fn


I64 = ctypes.c_int64
PTR = ctypes.c_void_p
F32 = ctypes.c_float
INT = ctypes.c_int
