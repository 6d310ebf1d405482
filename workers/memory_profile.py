"""How big a GPU's KV pool can be, sized the way vLLM sizes it.

The pool gets what is left of `gpu_memory_utilization` of the GPU's memory once the weights,
the peak activations of a forward pass at the largest batch the engine will run, and memory
outside torch's allocator (the CUDA context, other processes) are counted. The profiling pass
runs over a throwaway cache just big enough for it.
"""

from __future__ import annotations

import torch

from workers.attention.base import AttentionMetadata
from workers.model.paged_cache import allocate_kv_cache


def kv_budget_bytes(
    total_bytes: int, utilization: float, peak_torch_bytes: int, non_torch_bytes: int
) -> int:
    """Bytes for the pool; raises ValueError naming the fix when nothing is left."""
    budget = int(total_bytes * utilization) - peak_torch_bytes - non_torch_bytes
    if budget <= 0:
        gib = 2**30
        raise ValueError(
            f"no GPU memory left for the KV cache: {utilization:.2f} of {total_bytes / gib:.1f} "
            f"GiB is taken by the weights and activations ({peak_torch_bytes / gib:.1f} GiB) "
            f"and memory outside torch ({non_torch_bytes / gib:.1f} GiB): raise "
            "gpu_memory_utilization, lower max_num_batched_tokens, or use a bigger GPU"
        )
    return budget


def profile_forward(model, num_tokens: int, num_seqs: int, block_size: int) -> torch.Tensor:
    """One forward pass of `num_tokens` tokens in `num_seqs` prefills (all their logits rows
    sampled), on the model's device; returns the logits."""
    config = model.config
    device = model.embed_tokens.weight.device
    num_seqs = max(1, min(num_seqs, num_tokens))
    lens = [num_tokens // num_seqs + (i < num_tokens % num_seqs) for i in range(num_seqs)]
    tables, next_block = [], 0
    for n in lens:
        blocks = -(-n // block_size)
        tables.append(list(range(next_block, next_block + blocks)))
        next_block += blocks
    caches = allocate_kv_cache(
        config, next_block, block_size, model.embed_tokens.weight.dtype, device
    )
    meta = AttentionMetadata.build(lens, lens, tables, block_size, device)
    ids = torch.zeros(num_tokens, dtype=torch.int64, device=device)
    positions = torch.cat([torch.arange(n, device=device) for n in lens])
    rows = torch.cumsum(torch.tensor(lens, device=device), 0) - 1
    with torch.inference_mode():
        return model(ids, positions, caches, meta, rows)


def profiled_kv_budget(
    model,
    device: torch.device,
    utilization: float,
    max_num_batched_tokens: int,
    max_num_seqs: int,
    block_size: int,
) -> int:
    """KV pool bytes on a CUDA device after a profiling pass at the engine's largest step."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    profile_forward(model, max_num_batched_tokens, max_num_seqs, block_size)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    non_torch = total - free - torch.cuda.memory_reserved(device)
    return kv_budget_bytes(total, utilization, peak, max(0, non_torch))
