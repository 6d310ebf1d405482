"""The paged KV cache: one tensor allocated once at start, carved into fixed-size blocks."""

from __future__ import annotations

import torch

from workers.model.config import ModelConfig


def kv_block_bytes(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes across all layers (keys and values)."""
    per_token = 2 * config.num_hidden_layers * config.kv_size * dtype.itemsize
    return per_token * block_size


def num_blocks_for_budget(
    config: ModelConfig, block_size: int, dtype: torch.dtype, kv_cache_bytes: int
) -> int:
    num_blocks = kv_cache_bytes // kv_block_bytes(config, block_size, dtype)
    if num_blocks < 1:
        raise ValueError(
            f"kv_cache_bytes={kv_cache_bytes} holds no block of {block_size} tokens "
            f"({kv_block_bytes(config, block_size, dtype)} bytes each)"
        )
    return int(num_blocks)


def allocate_kv_cache(
    config: ModelConfig,
    num_blocks: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> list[torch.Tensor]:
    """One contiguous allocation; each layer gets a view [2, num_blocks, block_size, kv, dim]."""
    cache = torch.zeros(
        config.num_hidden_layers,
        2,
        num_blocks,
        block_size,
        config.num_key_value_heads,
        config.head_dim,
        dtype=dtype,
        device=device,
    )
    return list(cache.unbind(0))
