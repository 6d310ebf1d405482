"""Which attention backend an engine uses: `auto`, `torch`, `triton` or `flash_attn`.

`auto` is flash-attention when a build of it is installed (and the block size suits it), else
Triton, on CUDA; the torch backend (with its native CPU kernel) on the CPU. A backend that is
asked for and cannot run fails at start, naming what to install or change.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from workers.attention.base import AttentionBackend

BACKENDS = ("auto", "torch", "triton", "flash_attn")
GPU_EXTRA = "pip install 'manta[gpu]'"


def triton_runs_on(device: torch.device) -> bool:
    """Triton kernels run on CUDA tensors, and on CPU tensors under its interpreter."""
    if importlib.util.find_spec("triton") is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend_name(name: str, device: torch.device, block_size: int) -> str:
    """The backend `name` means on this device; raises ValueError if it cannot run here."""
    if name not in BACKENDS:
        raise ValueError(f"attention_backend {name!r} is not one of {', '.join(BACKENDS)}")
    if name == "auto":
        if device.type != "cuda":
            return "torch"
        from workers.attention.flash_attn_backend import load_flash_attn

        kernel = load_flash_attn()
        if kernel is not None and block_size % kernel.block_multiple == 0:
            return "flash_attn"
        return "triton" if triton_runs_on(device) else "torch"
    if name == "triton" and not triton_runs_on(device):
        if importlib.util.find_spec("triton") is None:
            raise ValueError(f"attention_backend 'triton' needs the triton package: {GPU_EXTRA}")
        raise ValueError(
            "attention_backend 'triton' runs on CUDA tensors; on the CPU only under Triton's "
            "interpreter (TRITON_INTERPRET=1, for tests: slow). Use 'torch' or 'auto' on CPU"
        )
    if name == "flash_attn" and device.type != "cuda":
        raise ValueError("attention_backend 'flash_attn' needs a CUDA device; use 'auto' on CPU")
    return name


def make_attention_backend(name: str, device: torch.device, block_size: int) -> AttentionBackend:
    """A ready backend for `name` (after resolving `auto`) on `device`."""
    name = resolve_backend_name(name, device, block_size)
    if name == "triton":
        from workers.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend()
    if name == "flash_attn":
        from workers.attention.flash_attn_backend import (
            INSTALL_HINT,
            FlashAttnBackend,
            load_flash_attn,
        )

        kernel = load_flash_attn()
        if kernel is None:
            raise ValueError(f"attention_backend 'flash_attn' is not installed: {INSTALL_HINT}")
        return FlashAttnBackend(kernel, block_size)
    from workers.attention.torch_ref import TorchAttentionBackend

    return TorchAttentionBackend()
