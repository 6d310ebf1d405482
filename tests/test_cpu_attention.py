"""The CPU paged-attention kernel against a float64 reference written from the definition, and
the torch backend with the kernel against the pure-torch path, on shuffled block tables."""

from __future__ import annotations

import random
import threading

import pytest
import torch

from workers.attention import cpu_kernels
from workers.attention.base import AttentionMetadata
from workers.attention.torch_ref import TorchAttentionBackend


def reference(query, key_cache, value_cache, tables, q_lens, seq_lens, scale, window):
    """softmax(q k^T * scale) v per query token, causal (and windowed), in float64."""
    out = torch.zeros(query.shape, dtype=torch.float64)
    block_size = key_cache.shape[1]
    group = query.shape[1] // key_cache.shape[2]
    start = 0
    for table, q_len, s_len in zip(tables, q_lens, seq_lens):
        slots = [table[p // block_size] * block_size + p % block_size for p in range(s_len)]
        k = key_cache.flatten(0, 1)[slots].double().repeat_interleave(group, dim=1)
        v = value_cache.flatten(0, 1)[slots].double().repeat_interleave(group, dim=1)
        for i in range(q_len):
            pos = s_len - q_len + i
            lo = 0 if window is None else max(0, pos - window + 1)
            scores = torch.einsum("hd,khd->hk", query[start + i].double(), k[lo : pos + 1])
            weights = (scores * scale).softmax(-1)
            out[start + i] = torch.einsum("hk,khd->hd", weights, v[lo : pos + 1])
        start += q_len
    return out


def make_batch(seed, q_lens, seq_lens, block_size, heads, kv_heads, head_dim):
    """Random query and KV pool; each sequence's blocks are scattered over the pool."""
    gen = torch.Generator().manual_seed(seed)
    need = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(need) + 3
    ids = list(range(num_blocks))
    random.Random(seed).shuffle(ids)
    tables, width = [], max(need)
    for n in need:
        tables.append(ids[:n] + [0] * (width - n))
        ids = ids[n:]
    shape = (num_blocks, block_size, kv_heads, head_dim)
    key_cache = torch.randn(shape, generator=gen)
    value_cache = torch.randn(shape, generator=gen)
    query = torch.randn(sum(q_lens), heads, head_dim, generator=gen)
    return query, key_cache, value_cache, tables


CASES = [
    # q_lens, seq_lens, block_size, heads, kv_heads, head_dim, window
    ([1, 1, 1], [1, 17, 40], 16, 4, 2, 64, None),
    ([1, 5, 3], [9, 12, 30], 4, 8, 2, 32, None),
    ([2, 1], [33, 7], 1, 4, 4, 80, None),
    ([1, 4, 16], [50, 20, 16], 16, 6, 3, 64, 7),
    ([40, 1, 23], [100, 64, 23], 8, 4, 1, 16, None),  # long queries span several tiles
    ([17], [70], 16, 2, 2, 8, 5),
    ([33, 2, 5], [80, 40, 5], 16, 8, 2, 32, None),  # transposed-key tiles, group of 4
]


@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_the_definition(case):
    q_lens, seq_lens, block_size, heads, kv_heads, head_dim, window = case
    query, key_cache, value_cache, tables = make_batch(
        len(q_lens), q_lens, seq_lens, block_size, heads, kv_heads, head_dim
    )
    meta = AttentionMetadata.build(q_lens, seq_lens, tables, block_size)
    out = torch.full_like(query, float("nan"))
    scale = head_dim**-0.5
    everyone = torch.arange(len(q_lens))
    cpu_kernels.paged_attention(
        query, key_cache, value_cache, meta.block_tables, meta.query_start_loc, meta.seq_lens,
        everyone, out, scale, window,
    )  # fmt: skip
    expected = reference(query, key_cache, value_cache, tables, q_lens, seq_lens, scale, window)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_only_the_chosen_sequences_are_written_and_any_thread_may_call():
    q_lens, seq_lens = [1, 2, 1], [10, 20, 30]
    query, key_cache, value_cache, tables = make_batch(7, q_lens, seq_lens, 4, 4, 2, 32)
    meta = AttentionMetadata.build(q_lens, seq_lens, tables, 4)
    out = torch.full_like(query, float("nan"))

    def run() -> None:
        cpu_kernels.paged_attention(
            query, key_cache, value_cache, meta.block_tables, meta.query_start_loc,
            meta.seq_lens, torch.tensor([0, 2]), out, 0.5, None,
        )  # fmt: skip

    worker = threading.Thread(target=run)  # the engine steps on a thread of its own
    worker.start()
    worker.join()
    assert out[[0, 3]].isfinite().all() and out[1:3].isnan().all()
    expected = reference(query, key_cache, value_cache, tables, q_lens, seq_lens, 0.5, None)
    torch.testing.assert_close(out[[0, 3]].double(), expected[[0, 3]], rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_refused_with_the_reason():
    query, key_cache, value_cache, tables = make_batch(1, [1], [5], 4, 2, 2, 8)
    meta = AttentionMetadata.build([1], [5], tables, 4)
    args = (meta.block_tables, meta.query_start_loc, meta.seq_lens, torch.tensor([0]))
    with pytest.raises(ValueError, match="query must be a float32"):
        cpu_kernels.paged_attention(
            query.double(), key_cache, value_cache, *args, torch.empty_like(query), 1.0, None
        )
    with pytest.raises(ValueError, match="int64"):
        cpu_kernels.paged_attention(
            query, key_cache, value_cache, meta.block_tables.int(), *args[1:],
            torch.empty_like(query), 1.0, None,
        )  # fmt: skip


@pytest.mark.parametrize("window", [None, 6])
def test_backend_with_the_kernel_equals_the_pure_torch_path(window):
    """A mixed step (decodes, a verification run, a prefill with cached context) through the
    backend: KV written into the slots, then attended, with and without the kernel."""
    q_lens, seq_lens, block_size = [1, 4, 30, 1], [19, 9, 45, 1], 4
    query, key_cache, value_cache, tables = make_batch(3, q_lens, seq_lens, block_size, 4, 2, 16)
    gen = torch.Generator().manual_seed(5)
    key = torch.randn(sum(q_lens), 2, 16, generator=gen)
    value = torch.randn(sum(q_lens), 2, 16, generator=gen)
    outs = []
    for native in (True, False):
        cache = torch.stack([key_cache, value_cache])
        meta = AttentionMetadata.build(q_lens, seq_lens, tables, block_size)
        backend = TorchAttentionBackend(native_kernel=native)
        outs.append(backend.forward(query, key, value, cache, meta, 0.25, window))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
