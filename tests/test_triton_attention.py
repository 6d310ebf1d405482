"""The Triton attention kernels, run on CPU tensors by Triton's interpreter, against the
pure-torch reference backend: mixed prefill / decode / verification batches over scattered
block tables, block sizes 1, 16 and 32, GQA groups 1, 4 and 8, head dims 64 and 128, prefix
hits that end mid-block, sliding windows and split-K."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run on the CPU

import random  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from workers.attention import triton_kernels  # noqa: E402
from workers.attention.base import AttentionMetadata  # noqa: E402
from workers.attention.torch_ref import TorchAttentionBackend  # noqa: E402
from workers.attention.triton_backend import (  # noqa: E402
    TritonAttentionBackend,
    choose_splits,
    make_tiles,
)


def make_step(seed, q_lens, seq_lens, block_size, heads, kv_heads, head_dim, dtype):
    """A step's new q/k/v, a KV pool holding random earlier context, and scattered tables."""
    gen = torch.Generator().manual_seed(seed)
    need = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(need) + 2
    ids = list(range(num_blocks))
    random.Random(seed).shuffle(ids)
    tables = []
    for n in need:
        tables.append(ids[:n])
        ids = ids[n:]
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype)
    tokens = sum(q_lens)
    query = torch.randn(tokens, heads, head_dim, generator=gen).to(dtype)
    # Keys and values as views of one fused projection, as the model produces them.
    kv = torch.randn(tokens, 2 * kv_heads * head_dim, generator=gen).to(dtype)
    key = kv[:, : kv_heads * head_dim].view(tokens, kv_heads, head_dim)
    value = kv[:, kv_heads * head_dim :].view(tokens, kv_heads, head_dim)
    meta = AttentionMetadata.build(q_lens, seq_lens, tables, block_size)
    return query, key, value, cache, meta


def run_both(case, dtype=torch.float32, num_splits=None):
    q_lens, seq_lens, block_size, heads, kv_heads, head_dim, window = case
    query, key, value, cache, meta = make_step(
        len(q_lens) + block_size, q_lens, seq_lens, block_size, heads, kv_heads, head_dim, dtype
    )
    scale = head_dim**-0.5
    ref_cache, tri_cache = cache.clone(), cache.clone()
    expected = TorchAttentionBackend(native_kernel=False).forward(
        query, key, value, ref_cache, meta, scale, window
    )
    meta.plan = None
    got = TritonAttentionBackend(num_splits).forward(
        query, key, value, tri_cache, meta, scale, window
    )
    return expected, got, ref_cache, tri_cache


CASES = [
    # q_lens, seq_lens, block_size, heads, kv_heads, head_dim, window
    ([1, 1, 1], [1, 17, 40], 16, 4, 4, 64, None),  # decodes, group 1
    ([1, 5, 3], [9, 12, 30], 16, 8, 2, 64, None),  # decode + verification rows, group 4
    ([20, 1], [45, 7], 1, 8, 1, 64, None),  # block size 1, group 8
    ([24, 1, 4], [24, 33, 70], 32, 4, 1, 128, None),  # fresh prefill, block size 32
    ([7, 1], [23, 19], 16, 4, 2, 128, None),  # prefix hit ends mid-block (16 + 7 tokens)
    ([12, 1, 3], [40, 50, 19], 16, 4, 1, 64, 9),  # sliding window
    ([70, 2], [90, 35], 16, 2, 2, 64, None),  # a query spanning several tiles
]


@pytest.mark.parametrize("case", CASES)
def test_matches_the_torch_reference(case):
    expected, got, ref_cache, tri_cache = run_both(case)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # The kernel that stores new K/V wrote exactly the slots the reference wrote.
    assert torch.equal(tri_cache, ref_cache)


@pytest.mark.parametrize("splits", [2, 4])
def test_split_keys_give_the_same_attention(splits):
    case = ([1, 1, 3], [300, 41, 130], 16, 8, 2, 64, None)
    expected, got, _, _ = run_both(case, num_splits=splits)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    window_case = ([1, 2], [200, 90], 16, 4, 4, 64, 50)
    expected, got, _, _ = run_both(window_case, num_splits=splits)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_bfloat16_within_its_precision():
    case = ([6, 1, 1], [30, 64, 5], 16, 8, 2, 64, None)
    expected, got, ref_cache, tri_cache = run_both(case, dtype=torch.bfloat16)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)
    assert torch.equal(tri_cache, ref_cache)


def test_padding_slots_are_not_written():
    """A negative slot (a CUDA graph's padding row) leaves the cache alone."""
    cache = torch.zeros(2, 4, 16, 2, 64)
    key = torch.ones(3, 2, 64)
    value = torch.full((3, 2, 64), 2.0)
    slots = torch.tensor([5, -1, 17])
    triton_kernels.store_kv(key, value, cache[0], cache[1], slots)
    flat = cache.flatten(1, 2)
    assert torch.equal(flat[0, 5], key[0]) and torch.equal(flat[1, 17], value[2])
    assert int((flat[0].abs().sum(dim=(1, 2)) > 0).sum()) == 2


def test_tiles_cover_every_query_once():
    seqs, firsts = make_tiles([1, 5, 16, 17], block_q=4)
    assert seqs.tolist() == [0, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 3]
    assert firsts.tolist() == [0, 0, 4, 0, 4, 8, 12, 0, 4, 8, 12, 16]
    assert seqs.dtype == np.int64


def test_splits_only_where_they_pay():
    assert choose_splits(num_programs=8, max_seq_len=32768) == 16
    assert choose_splits(num_programs=128 * 8, max_seq_len=32768) == 1  # the GPU is full
    assert choose_splits(num_programs=8, max_seq_len=600) == 1  # keys too few to split
    assert choose_splits(num_programs=64, max_seq_len=8192) == 4
