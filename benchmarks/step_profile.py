"""Where one offline run's time goes, by kind of work: what the benchmarks print as the profile.

The run is replayed under `torch.profiler`, with the CPU kernels (called through ctypes, which
the profiler cannot see) wrapped in named ranges, and every op is put in one bucket: linear
layers, attention, the fused elementwise ops, other torch ops, and what is left of the wall
time (the engine's Python: scheduling, input preparation, sampling glue, detokenizing).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

from torch.profiler import ProfilerActivity, profile, record_function

from workers.attention import cpu_kernels
from workers.model import cpu_ops

BUCKETS = {
    "linear layers (oneDNN / torch matmul)": (
        "mkldnn::_linear_pointwise",
        "aten::mm",
        "aten::addmm",
    ),
    "attention (paged kernel)": ("cpu_paged_attention",),
    "fused norm / rotary / SiLU": ("cpu_add_rms_norm", "cpu_rotary", "cpu_silu_mul"),
}
NATIVE = [(cpu_kernels, "paged_attention", "cpu_paged_attention")]
NATIVE += [(cpu_ops, name, f"cpu_{name}") for name in ("add_rms_norm", "rotary", "silu_mul")]


@contextlib.contextmanager
def _named_native_calls() -> Iterator[None]:
    """Wrap the ctypes-backed functions in profiler ranges for the duration."""
    saved = []
    for module, attr, label in NATIVE:
        fn = getattr(module, attr)
        saved.append((module, attr, fn))

        def wrapped(*args, _fn=fn, _label=label, **kwargs):
            with record_function(_label):
                return _fn(*args, **kwargs)

        setattr(module, attr, wrapped)
    try:
        yield
    finally:
        for module, attr, fn in saved:
            setattr(module, attr, fn)


def profile_run(run: Callable[[], Any]) -> dict[str, Any]:
    """Run `run()` once under the profiler; seconds and shares per bucket of work."""
    with _named_native_calls(), profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        run()
        wall = time.perf_counter() - start
    seconds = dict.fromkeys(BUCKETS, 0.0)
    other = 0.0
    for event in prof.key_averages():
        self_s = event.self_cpu_time_total / 1e6
        bucket = next((b for b, names in BUCKETS.items() if event.key in names), None)
        if bucket is not None:
            seconds[bucket] += self_s
        elif event.key.startswith("aten::"):
            other += self_s
    seconds["other torch ops"] = other
    # Self times of ops on the calling thread add up to at most the wall time; the rest is
    # the Python around them (profiling adds a little of its own there).
    seconds["engine Python and glue"] = max(0.0, wall - sum(seconds.values()))
    return {
        "wall_s": wall,
        "seconds": seconds,
        "share": {key: value / wall for key, value in seconds.items()},
    }
