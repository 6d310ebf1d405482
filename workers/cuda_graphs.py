"""CUDA graphs for decode steps: a whole forward pass replayed as one launch.

A decode step of a small model on a big GPU is bound by the CPU launching hundreds of kernels,
not by the GPU running them. At start the forward pass is captured once per batch size (1, 2,
4, 8, ... up to `max_num_seqs`) over static input buffers; a pure-decode step copies its inputs
into the buffers of the next captured size, padding the rest (padding tokens write no KV: slot
-1, and attend one key), and replays. Steps with longer queries (prefill, speculative
verification) run eagerly. With `capture=False` the same padded static-buffer path runs
without graphs, which is how it is tested on a CPU.
"""

from __future__ import annotations

import torch

from workers.attention.base import AttentionBackend, AttentionMetadata


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Powers of two up to `max_num_seqs`, and `max_num_seqs` itself."""
    sizes, size = [], 1
    while size < max_num_seqs:
        sizes.append(size)
        size *= 2
    return sizes + [max_num_seqs]


class DecodeGraphs:
    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches: list[torch.Tensor],
        backend: AttentionBackend,
        max_num_seqs: int,
        max_model_len: int,
        block_size: int,
        capture: bool = True,
    ) -> None:
        self.model, self.kv_caches, self.backend = model, kv_caches, backend
        self.sizes = capture_sizes(max_num_seqs)
        self.block_size, self.max_model_len = block_size, max_model_len
        n, device = self.sizes[-1], kv_caches[0].device
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int64, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros(
            n, -(-max_model_len // block_size), dtype=torch.int64, device=device
        )
        self.rows = torch.arange(n, dtype=torch.int64, device=device)
        self._metas = {size: self._meta(size) for size in self.sizes}
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        self.num_replays = 0
        if capture:
            self._capture_all()

    def _meta(self, size: int) -> AttentionMetadata:
        """Metadata over the first `size` rows of the static buffers; its host lists give the
        worst case (every sequence at the longest context) for backends that plan from them."""
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:size],
            query_start_loc=self.query_start_loc[: size + 1].cpu(),
            seq_lens=self.seq_lens[:size].cpu(),
            block_tables=self.block_tables[:size],
            block_size=self.block_size,
            query_lens_list=[1] * size,
            seq_lens_list=[self.max_model_len] * size,
            device_query_start_loc=self.query_start_loc[: size + 1],
            device_seq_lens=self.seq_lens[:size],
        )

    def _forward(self, size: int) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(
                self.input_ids[:size],
                self.positions[:size],
                self.kv_caches,
                self._metas[size],
                self.rows[:size],
            )

    def _capture_all(self) -> None:
        """Largest first, so smaller graphs reuse its memory pool."""
        pool = None
        for size in reversed(self.sizes):
            meta = self._metas[size]
            self.backend.prepare_graph(meta)
            self._forward(size)  # compiles kernels, and the allocator settles
            torch.cuda.synchronize()
            self.backend.prepare_graph(meta)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._outputs[size] = self._forward(size)
            pool = graph.pool()
            self._graphs[size] = graph
        torch.cuda.synchronize()

    def can_run(self, meta: AttentionMetadata, num_logits: int) -> bool:
        """A pure-decode step (one token and one logits row per sequence) that fits."""
        num_seqs = meta.num_seqs
        return (
            num_seqs <= self.sizes[-1]
            and meta.slot_mapping.shape[0] == num_seqs == num_logits
            and meta.block_tables.shape[1] <= self.block_tables.shape[1]
        )

    def run(self, input_ids, positions, meta: AttentionMetadata) -> torch.Tensor:
        """The step's logits: inputs copied into the static buffers, padded, replayed."""
        n = meta.num_seqs
        size = next(s for s in self.sizes if s >= n)
        width = meta.block_tables.shape[1]
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.seq_lens[:n].copy_(meta.device_seq_lens)
        self.block_tables[:n, :width].copy_(meta.block_tables)
        # Padding rows: no KV written, one key attended (any block id in range will do).
        self.slot_mapping[n:size].fill_(-1)
        self.seq_lens[n:size].fill_(1)
        self.input_ids[n:size].zero_()
        self.positions[n:size].zero_()
        self.num_replays += 1
        graph = self._graphs.get(size)
        if graph is None:
            return self._forward(size)[:n]
        graph.replay()
        return self._outputs[size][:n]
