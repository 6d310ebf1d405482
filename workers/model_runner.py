"""Turns a scheduled batch into model inputs and runs the forward pass.

Inputs are written into host buffers allocated once at start (viewed as tensors without
copying), so a steady-state decode step allocates no input memory; on a GPU they are copied
into device buffers that are likewise allocated once.
"""

from __future__ import annotations

import numpy as np
import torch

from workers.attention.base import AttentionMetadata


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches: list[torch.Tensor],
        block_size: int,
        max_num_batched_tokens: int,
        max_num_seqs: int,
        max_model_len: int,
        max_query_tokens_per_seq: int = 1,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = kv_caches[0].device
        max_blocks = -(-max_model_len // block_size)
        self.max_tokens = max_num_batched_tokens
        self.max_seqs = max_num_seqs
        # Host buffers, written in place every step.
        self._ids = np.zeros(max_num_batched_tokens, np.int64)
        self._pos = np.zeros(max_num_batched_tokens, np.int64)
        self._slots = np.zeros(max_num_batched_tokens, np.int64)
        self._starts = np.zeros(max_num_seqs + 1, np.int64)
        self._seq_lens = np.zeros(max_num_seqs, np.int64)
        self._tables = np.zeros((max_num_seqs, max_blocks), np.int64)
        self._logit_rows = np.zeros(max_num_seqs * max_query_tokens_per_seq, np.int64)
        self._arange = np.arange(max_model_len, dtype=np.int64)

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        host = torch.from_numpy(array)
        return host if self.device.type == "cpu" else host.to(self.device, non_blocking=True)

    def execute(
        self,
        token_ids: list[list[int]],  # all known tokens of each scheduled sequence
        num_computed: list[int],  # tokens whose KV is already in the cache
        num_scheduled: list[int],  # tokens to compute this step
        block_tables: list[list[int]],
        logits_rows: list[list[int]],  # per sequence, which of its scheduled tokens need logits
    ) -> torch.Tensor:
        """One forward pass; returns float32 logits for the requested rows, in order."""
        num_seqs = len(num_scheduled)
        total = 0
        num_rows = 0
        width = 1
        for i in range(num_seqs):
            start, n = num_computed[i], num_scheduled[i]
            end = start + n
            self._ids[total : total + n] = token_ids[i][start:end]
            self._pos[total : total + n] = self._arange[start:end]
            table = block_tables[i]
            self._tables[i, : len(table)] = table
            width = max(width, len(table))
            self._seq_lens[i] = end
            for row in logits_rows[i]:
                self._logit_rows[num_rows] = total + row
                num_rows += 1
            total += n
            self._starts[i + 1] = total
        positions = self._pos[:total]
        seq_of_token = np.repeat(np.arange(num_seqs), num_scheduled)
        blocks = self._tables[seq_of_token, positions // self.block_size]
        self._slots[:total] = blocks * self.block_size + positions % self.block_size

        meta = AttentionMetadata(
            slot_mapping=self._tensor(self._slots[:total]),
            query_start_loc=torch.from_numpy(self._starts[: num_seqs + 1]),
            seq_lens=torch.from_numpy(self._seq_lens[:num_seqs]),
            block_tables=self._tensor(self._tables[:num_seqs, :width]),
            block_size=self.block_size,
            query_lens_list=list(num_scheduled),
            seq_lens_list=[c + n for c, n in zip(num_computed, num_scheduled)],
        )
        with torch.inference_mode():
            return self.model(
                self._tensor(self._ids[:total]),
                self._tensor(self._pos[:total]),
                self.kv_caches,
                meta,
                self._tensor(self._logit_rows[:num_rows]),
            )
