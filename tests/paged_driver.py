"""Runs a model over a hand-written schedule of sequences on a paged cache, for the tests."""

from __future__ import annotations

import random

import torch

from workers.attention.base import AttentionMetadata
from workers.model.paged_cache import allocate_kv_cache


class PagedDriver:
    """Owns a KV cache and hands out physical blocks in a shuffled order, so a sequence's
    blocks are never contiguous and the model must really follow its block table."""

    def __init__(self, model, block_size: int, num_blocks: int = 256, seed: int = 0) -> None:
        self.model = model
        self.block_size = block_size
        self.kv = allocate_kv_cache(model.config, num_blocks, block_size, torch.float32)
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)
        self.tables: dict[str, list[int]] = {}
        self.tokens: dict[str, list[int]] = {}
        self.computed: dict[str, int] = {}

    def add(self, name: str, token_ids: list[int], share_from: str | None = None, shared_blocks=0):
        """A sequence; optionally its first `shared_blocks` blocks are another's physical blocks
        (their KV already computed there)."""
        self.tokens[name] = list(token_ids)
        self.tables[name] = list(self.tables[share_from][:shared_blocks]) if share_from else []
        self.computed[name] = shared_blocks * self.block_size

    def step(self, work: dict[str, int]) -> dict[str, torch.Tensor]:
        """Compute `work[name]` more tokens of each named sequence in ONE forward call; returns
        the logits of every computed token, per sequence."""
        ids, positions, q_lens, s_lens, tables = [], [], [], [], []
        for name, n in work.items():
            start = self.computed[name]
            end = start + n
            assert end <= len(self.tokens[name])
            while len(self.tables[name]) * self.block_size < end:
                self.tables[name].append(self.free.pop())
            ids += self.tokens[name][start:end]
            positions += list(range(start, end))
            q_lens.append(n)
            s_lens.append(end)
            tables.append(self.tables[name])
            self.computed[name] = end
        meta = AttentionMetadata.build(q_lens, s_lens, tables, self.block_size)
        with torch.inference_mode():
            logits = self.model(
                torch.tensor(ids),
                torch.tensor(positions),
                self.kv,
                meta,
                torch.arange(len(ids)),
            )
        return dict(zip(work, logits.split(q_lens)))

    def append(self, name: str, token_id: int) -> None:
        self.tokens[name].append(token_id)
