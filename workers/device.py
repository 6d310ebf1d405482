"""Where an engine computes and in what dtype: `auto` settings resolved once, at start.

`auto` is the replica's GPU when CUDA is available (Ray sets CUDA_VISIBLE_DEVICES to the GPU it
reserved for the actor, so that is `cuda:0` inside it), else the CPU; bfloat16 on CUDA,
float32 on the CPU, which computes bfloat16 two hundred times slower. A device that is asked
for and missing fails here, with the fix in the message, not at the first request.
"""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """`auto`, `cpu`, `cuda` or `cuda:N` as a torch device that exists on this machine."""
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"device {name!r} is not a torch device: use auto, cpu or cuda") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {name!r} was asked for but CUDA is not available here (torch "
                f"{torch.__version__}, built for CUDA {torch.version.cuda}): install a CUDA "
                "build of torch and run on a GPU node, or use device 'cpu'"
            )
        index = 0 if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise ValueError(
                f"device {name!r} was asked for but this process sees "
                f"{torch.cuda.device_count()} GPU(s)"
            )
        return torch.device("cuda", index)
    if device.type != "cpu":
        raise ValueError(f"device {name!r} is not supported: use auto, cpu or cuda")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` (bfloat16 on CUDA, float32 elsewhere) or a named dtype."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not supported: use auto, {', '.join(DTYPES)}")
    return DTYPES[name]
