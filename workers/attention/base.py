"""The attention backend interface: how a model layer reads and writes the paged KV cache.

A step's batch is a flat run of tokens from many sequences (no padding). Sequence i owns the
query tokens `query_start_loc[i]:query_start_loc[i+1]`, which are the LAST tokens of its
context of `seq_lens[i]` tokens; its keys and values live in the cache blocks listed in
`block_tables[i]`. Every backend (torch reference, Triton, flash-attn) takes the same metadata.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: flat cache slot (block_id * block_size + offset)
    query_start_loc: torch.Tensor  # [B + 1] int64, on the host
    seq_lens: torch.Tensor  # [B] int64, on the host: context length including this step
    block_tables: torch.Tensor  # [B, max_blocks] int64 (padding entries are never read)
    block_size: int
    # Host-side lists of the same numbers, so backends can plan without device syncs.
    query_lens_list: list[int] = field(default_factory=list)
    seq_lens_list: list[int] = field(default_factory=list)
    # A backend stores its per-step plan here once, and every layer reuses it.
    plan: object | None = None
    # query_start_loc and seq_lens on the cache's device, for kernels that read them there
    # (the host tensors themselves on the CPU).
    device_query_start_loc: torch.Tensor | None = None
    device_seq_lens: torch.Tensor | None = None

    def __post_init__(self) -> None:
        device = self.slot_mapping.device
        if self.device_query_start_loc is None:
            self.device_query_start_loc = self.query_start_loc.to(device)
        if self.device_seq_lens is None:
            self.device_seq_lens = self.seq_lens.to(device)

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        seq_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> AttentionMetadata:
        """Metadata from plain lists; the slot of each new token follows from its position."""
        if not (len(query_lens) == len(seq_lens) == len(block_tables)):
            raise ValueError("query_lens, seq_lens and block_tables need one entry per sequence")
        slots: list[int] = []
        for q_len, s_len, table in zip(query_lens, seq_lens, block_tables):
            if not 1 <= q_len <= s_len:
                raise ValueError(f"need 1 <= query_len <= seq_len, got {q_len} and {s_len}")
            if len(table) * block_size < s_len:
                raise ValueError(f"block table of {len(table)} blocks cannot hold {s_len} tokens")
            for pos in range(s_len - q_len, s_len):
                slots.append(table[pos // block_size] * block_size + pos % block_size)
        width = max(len(t) for t in block_tables)
        padded = [t + [0] * (width - len(t)) for t in block_tables]
        starts = [0]
        for q_len in query_lens:
            starts.append(starts[-1] + q_len)
        return cls(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            query_start_loc=torch.tensor(starts, dtype=torch.int64),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int64),
            block_tables=torch.tensor(padded, dtype=torch.int64, device=device),
            block_size=block_size,
            query_lens_list=list(query_lens),
            seq_lens_list=list(seq_lens),
        )

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens_list)


class AttentionBackend(ABC):
    """Computes causal attention of a step's queries over each sequence's paged context."""

    name: str = "abstract"
    # Whether a forward pass can be captured in a CUDA graph (no host work inside forward).
    supports_cuda_graphs: bool = False

    def prepare_graph(self, meta: AttentionMetadata) -> None:
        """Called before the warm-up and again before the capture of a CUDA graph over
        `meta`'s static buffers: by default the plan is dropped, so it is rebuilt inside the
        capture from the static device tensors (and replayed with them)."""
        meta.plan = None

    @abstractmethod
    def forward(
        self,
        query: torch.Tensor,  # [T, num_heads, head_dim]
        key: torch.Tensor,  # [T, num_kv_heads, head_dim]
        value: torch.Tensor,  # [T, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
    ) -> torch.Tensor:  # [T, num_heads * head_dim]
        """Write this step's keys/values into their slots, then attend."""
