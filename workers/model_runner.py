"""Turns a scheduled batch into model inputs and runs the forward pass.

Everything a step feeds the model lives in buffers allocated once at start. Each running
sequence owns a row of a persistent block table, and a step writes only the block ids added
since the sequence's last step (a decode step usually writes none); a steady-state decode step
allocates no input memory. On a GPU the host buffers are copied into device buffers that are
likewise allocated once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from workers.attention.base import AttentionMetadata
from workers.cuda_graphs import DecodeGraphs
from workers.kv_cache import KVCacheManager


@dataclass(slots=True)
class ModelInputs:
    """One forward pass's inputs; `logits_indices` are the rows whose logits are returned."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    logits_indices: torch.Tensor


class _Buffer:
    """A host array and, off the CPU, its device twin; `take(n)` gives the first n as a
    tensor on the device (copied there asynchronously)."""

    def __init__(self, shape: tuple[int, ...], device: torch.device) -> None:
        self.host = np.zeros(shape, np.int64)
        self._host_t = torch.from_numpy(self.host)
        on_cpu = device.type == "cpu"
        self._device_t = (
            self._host_t if on_cpu else torch.zeros(shape, dtype=torch.int64).to(device)
        )

    def take(self, n: int) -> torch.Tensor:
        if self._device_t is self._host_t:
            return self._host_t[:n]
        return self._device_t[:n].copy_(self._host_t[:n], non_blocking=True)


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches: list[torch.Tensor],
        kv: KVCacheManager,
        max_num_batched_tokens: int,
        max_num_seqs: int,
        max_model_len: int,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.kv = kv
        self.block_size = kv.block_size
        device = self.device = kv_caches[0].device
        max_blocks = -(-max_model_len // self.block_size)
        self._ids = _Buffer((max_num_batched_tokens,), device)
        self._pos = _Buffer((max_num_batched_tokens,), device)
        self._slots = _Buffer((max_num_batched_tokens,), device)
        self._logit_rows = _Buffer((max_num_batched_tokens,), device)
        self._starts_buf = _Buffer((max_num_seqs + 1,), device)
        self._seq_lens_buf = _Buffer((max_num_seqs,), device)
        self._starts, self._seq_lens = self._starts_buf.host, self._seq_lens_buf.host
        self._batch_rows = np.zeros(max_num_seqs, np.int64)
        # Persistent block tables: one row per live sequence, written incrementally.
        self._tables = np.zeros((max_num_seqs, max_blocks), np.int64)
        self._tables_t = torch.from_numpy(self._tables)
        self._step_tables = torch.zeros((max_num_seqs, max_blocks), dtype=torch.int64)
        self._row_of: dict[str, int] = {}
        self._free_rows = list(range(max_num_seqs - 1, -1, -1))
        self._arange = np.arange(max(max_model_len, max_num_batched_tokens), dtype=np.int64)
        self.graphs: DecodeGraphs | None = None  # replays pure-decode steps when set

    def prepare_inputs(
        self,
        seq_ids: Sequence[str],
        new_token_ids: Sequence[Sequence[int]],  # the tokens each sequence computes this step
        start_positions: Sequence[int],  # position of each sequence's first new token
        num_logits: Sequence[int],  # how many of each sequence's last new tokens need logits
    ) -> ModelInputs:
        """Inputs for one forward pass over the sequences' new tokens; their block tables come
        from the KV cache manager (slots for every new token must be allocated already)."""
        num_seqs = len(seq_ids)
        ids, pos, rows = self._ids.host, self._pos.host, self._logit_rows.host
        total = num_rows = width = 0
        for i, (seq_id, tokens, start) in enumerate(zip(seq_ids, new_token_ids, start_positions)):
            n = len(tokens)
            end = start + n
            ids[total : total + n] = tokens
            pos[total : total + n] = self._arange[start:end]
            self._batch_rows[i] = self._sync_table(seq_id)
            width = max(width, -(-end // self.block_size))
            self._seq_lens[i] = end
            k = num_logits[i]
            if k:
                rows[num_rows : num_rows + k] = self._arange[total + n - k : total + n]
                num_rows += k
            total += n
            self._starts[i + 1] = total
        batch_rows = self._batch_rows[:num_seqs]
        positions = pos[:total]
        seq_of_token = np.repeat(batch_rows, np.diff(self._starts[: num_seqs + 1]))
        blocks = self._tables[seq_of_token, positions // self.block_size]
        self._slots.host[:total] = blocks * self.block_size + positions % self.block_size
        tables = self._step_tables[:num_seqs, :width]
        torch.index_select(self._tables_t[:, :width], 0, torch.from_numpy(batch_rows), out=tables)
        if self.device.type != "cpu":
            tables = tables.to(self.device, non_blocking=True)
        meta = AttentionMetadata(
            slot_mapping=self._slots.take(total),
            query_start_loc=torch.from_numpy(self._starts[: num_seqs + 1]),
            seq_lens=torch.from_numpy(self._seq_lens[:num_seqs]),
            block_tables=tables,
            block_size=self.block_size,
            query_lens_list=[len(t) for t in new_token_ids],
            seq_lens_list=self._seq_lens[:num_seqs].tolist(),
            device_query_start_loc=self._starts_buf.take(num_seqs + 1),
            device_seq_lens=self._seq_lens_buf.take(num_seqs),
        )
        return ModelInputs(
            self._ids.take(total), self._pos.take(total), meta, self._logit_rows.take(num_rows)
        )

    def execute(self, inputs: ModelInputs) -> torch.Tensor:
        """One forward pass; float32 logits of the requested rows, in order."""
        graphs = self.graphs
        if graphs is not None and graphs.can_run(inputs.meta, len(inputs.logits_indices)):
            return graphs.run(inputs.input_ids, inputs.positions, inputs.meta)
        with torch.inference_mode():
            return self.model(
                inputs.input_ids,
                inputs.positions,
                self.kv_caches,
                inputs.meta,
                inputs.logits_indices,
            )

    def release(self, seq_ids: Sequence[str]) -> None:
        """Free the table rows of finished or preempted sequences (a preempted one gets a
        fresh table, written whole, when it is admitted again)."""
        for seq_id in seq_ids:
            row = self._row_of.pop(seq_id, None)
            if row is not None:
                self._free_rows.append(row)

    def _sync_table(self, seq_id: str) -> int:
        """The sequence's table row, with the block ids changed since its last step written."""
        row = self._row_of.get(seq_id)
        if row is None:
            row = self._row_of[seq_id] = self._free_rows.pop()
        start, block_ids = self.kv.sync_block_ids(seq_id)
        if start < len(block_ids):
            self._tables[row, start : len(block_ids)] = block_ids[start:]
        return row
