"""N-gram proposer: hand-made sequences, a naive reference under hypothesis, long contexts."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.spec_decode.ngram import NgramProposer


def reference_propose(
    token_ids: list[int], k: int, max_ngram: int, min_ngram: int, max_context: int
) -> list[int]:
    """Tries every n from longest to shortest and every earlier start from latest to first."""
    if k <= 0:
        return []
    context = token_ids[-max_context:]
    for n in range(max_ngram, min_ngram - 1, -1):
        if len(context) < n + 1:
            continue
        suffix = context[-n:]
        for start in range(len(context) - n - 1, -1, -1):
            if context[start : start + n] == suffix:
                return context[start + n : start + n + k]
    return []


def test_repeated_phrase_continues_it() -> None:
    proposer = NgramProposer()
    tokens = [5, 10, 11, 12, 13, 14, 99, 10, 11, 12]
    assert proposer.propose(tokens, 2) == [13, 14]
    assert proposer.propose(tokens, 3) == [13, 14, 99]


def test_longest_ngram_wins_over_more_recent_shorter_match() -> None:
    # The suffix [1, 2, 3] occurs at the start; [3] alone occurs more recently, before 8.
    tokens = [1, 2, 3, 7, 3, 8, 1, 2, 3]
    assert NgramProposer(max_ngram=3).propose(tokens, 1) == [7]
    assert NgramProposer(max_ngram=1).propose(tokens, 1) == [8]


def test_most_recent_occurrence_wins() -> None:
    tokens = [4, 5, 1, 4, 5, 2, 4, 5]
    assert NgramProposer(max_ngram=2).propose(tokens, 1) == [2]


def test_truncated_near_the_end() -> None:
    # The latest earlier copy of [7, 7] ends one token before the end: only one token follows.
    assert NgramProposer().propose([7] * 10, 5) == [7]
    assert NgramProposer().propose([1, 2, 3, 1, 2, 3], 5) == [1, 2, 3]


def test_no_match_and_k_zero() -> None:
    proposer = NgramProposer()
    assert proposer.propose([1, 2, 3, 4, 5], 3) == []
    assert proposer.propose([1, 2, 1], 0) == []
    assert proposer.propose([], 3) == []
    assert proposer.propose([1], 3) == []


def test_min_ngram_rejects_short_matches() -> None:
    tokens = [1, 2, 9, 3, 2]
    assert NgramProposer(min_ngram=1).propose(tokens, 1) == [9]
    assert NgramProposer(min_ngram=2).propose(tokens, 1) == []


def test_only_max_context_is_searched() -> None:
    tokens = [1, 2, 3, 4, 50, 51, 52, 1, 2, 3]
    assert NgramProposer(max_context=10).propose(tokens, 1) == [4]
    assert NgramProposer(max_context=6).propose(tokens, 1) == []


def test_accepts_numpy_and_tuples() -> None:
    tokens = [3, 1, 4, 1, 5, 3, 1, 4]
    expected = NgramProposer().propose(tokens, 3)
    assert expected == [1, 5, 3]
    assert NgramProposer().propose(tuple(tokens), 3) == expected
    assert NgramProposer().propose(np.array(tokens), 3) == expected


def test_bad_settings_raise() -> None:
    with pytest.raises(ValueError):
        NgramProposer(max_ngram=2, min_ngram=3)
    with pytest.raises(ValueError):
        NgramProposer(min_ngram=0)


@settings(max_examples=400, deadline=None)
@given(
    tokens=st.lists(st.integers(0, 3), max_size=40),
    k=st.integers(0, 6),
    max_ngram=st.integers(1, 5),
    min_offset=st.integers(0, 4),
    max_context=st.integers(2, 50),
)
def test_matches_reference(
    tokens: list[int], k: int, max_ngram: int, min_offset: int, max_context: int
) -> None:
    min_ngram = max(1, max_ngram - min_offset)
    proposer = NgramProposer(max_ngram, min_ngram, max_context)
    expected = reference_propose(tokens, k, max_ngram, min_ngram, max_context)
    assert proposer.propose(tokens, k) == expected


def test_long_context() -> None:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 32000, size=6000).tolist()
    phrase = tokens[1000:1010]
    tokens += phrase[:4]
    proposer = NgramProposer(max_context=4096)
    assert proposer.propose(tokens, 5) == reference_propose(tokens, 5, 4, 1, 4096)
    assert proposer.propose(tokens, 5) == []  # its earlier copy lies outside the window
    assert NgramProposer(max_context=8192).propose(tokens, 5) == phrase[4:9]
    repetitive = rng.integers(0, 3, size=4096).tolist()
    assert proposer.propose(repetitive, 5) == reference_propose(repetitive, 5, 4, 1, 4096)
