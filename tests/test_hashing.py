"""Block hashes are stable across processes, chained, keyed, and only cover full blocks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvstore.hashing import ROOT_HASH, hash_block, hash_blocks

# Fixed expectations: a change here breaks every prefix index already populated in a cluster.
KNOWN_PLAIN = 9983030374322311988  # hash_block(ROOT_HASH, [1, 2, 3, 4])
KNOWN_KEYED = 4077417677453754047  # hash_block(ROOT_HASH, [1, 2, 3, 4], b"llama")


def test_known_constants() -> None:
    assert ROOT_HASH == 0
    assert hash_block(ROOT_HASH, [1, 2, 3, 4]) == KNOWN_PLAIN
    assert hash_block(ROOT_HASH, (1, 2, 3, 4), b"llama") == KNOWN_KEYED


@pytest.mark.parametrize("seed", ["0", "12345"])
def test_stable_in_another_process(seed: str) -> None:
    code = (
        "from kvstore.hashing import hash_block;"
        "print(hash_block(0, [1, 2, 3, 4]), hash_block(0, [1, 2, 3, 4], b'llama'))"
    )
    env = {**os.environ, "PYTHONHASHSEED": seed}
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.split() == [str(KNOWN_PLAIN), str(KNOWN_KEYED)]


def test_hash_is_64_bit_and_accepts_large_values() -> None:
    h = hash_block(2**64 - 1, [2**63 - 1, -(2**63), 0])
    assert 0 <= h < 2**64


def test_chaining() -> None:
    tokens = list(range(12))
    hashes = hash_blocks(tokens, 4)
    assert len(hashes) == 3
    parent = ROOT_HASH
    for i, h in enumerate(hashes):
        parent = hash_block(parent, tokens[4 * i : 4 * i + 4])
        assert h == parent
    # Same block content under a different parent hashes differently.
    assert hash_block(hashes[0], [4, 5, 6, 7]) != hash_block(ROOT_HASH, [4, 5, 6, 7])
    # Continuing from a parent gives the tail of the full chain.
    assert hash_blocks(tokens[4:], 4, parent_hash=hashes[0]) == hashes[1:]


def test_changing_one_token_changes_all_later_hashes() -> None:
    a = hash_blocks([1, 2, 3, 4, 5, 6, 7, 8], 4)
    b = hash_blocks([1, 2, 3, 9, 5, 6, 7, 8], 4)
    assert a[0] != b[0] and a[1] != b[1]


def test_extra_key_changes_hash() -> None:
    tokens = [5, 6, 7, 8]
    assert hash_block(ROOT_HASH, tokens, b"model-a") != hash_block(ROOT_HASH, tokens, b"model-b")
    assert hash_block(ROOT_HASH, tokens, b"model-a") != hash_block(ROOT_HASH, tokens)
    assert hash_blocks(tokens, 4, b"k") == [hash_block(ROOT_HASH, tokens, b"k")]


def test_extra_key_is_length_prefixed() -> None:
    # Without the length prefix, moving bytes between key and tokens could collide.
    assert hash_block(ROOT_HASH, [1], b"") != hash_block(ROOT_HASH, [], b"\x01" + b"\x00" * 7)


def test_partial_block_gets_no_hash() -> None:
    assert hash_blocks([1, 2, 3], 4) == []
    assert hash_blocks([], 4) == []
    assert hash_blocks(list(range(11)), 4) == hash_blocks(list(range(8)), 4)
    assert len(hash_blocks(list(range(16)), 4)) == 4


def test_bad_block_size() -> None:
    with pytest.raises(ValueError):
        hash_blocks([1, 2], 0)
