"""Prompt-lookup drafts: continue the text the way it went after an earlier copy of its tail.

Models often repeat spans of the prompt or of their own output (code, quotes, lists), so the
tokens that followed the last earlier occurrence of the current tail are a cheap, model-free
guess of the next ones. The proposer is deterministic: its draft distribution is one-hot.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class NgramProposer:
    """Proposes up to k tokens by matching the longest recent n-gram suffix earlier in context.

    Cost per call, for a searched context of L tokens and N = max_ngram: one vectorised pass
    over L tokens to find earlier copies of the last token, then N - 1 passes over the
    surviving candidates only, so O(L + c * N) with c the last token's count (usually small).
    """

    def __init__(self, max_ngram: int = 4, min_ngram: int = 1, max_context: int = 4096) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        if max_context < 2:
            raise ValueError(f"max_context must be at least 2, got {max_context}")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.max_context = max_context

    def propose(self, token_ids: Sequence[int], k: int) -> list[int]:
        """Up to k tokens that followed the most recent earlier occurrence of the longest
        suffix n-gram (max_ngram >= n >= min_ngram) within the last max_context tokens;
        [] when no suffix of min_ngram tokens recurs or k == 0."""
        if k <= 0 or len(token_ids) <= self.min_ngram:
            return []
        context = np.asarray(token_ids[-self.max_context :], dtype=np.int64)
        last = len(context) - 1
        # Candidate end positions e < last of an earlier copy of the suffix, longest first kept.
        ends = np.flatnonzero(context[:last] == context[last])
        best = ends if self.min_ngram == 1 else None
        for n in range(2, min(self.max_ngram, last) + 1):
            ends = ends[ends >= n - 1]
            ends = ends[context[ends - (n - 1)] == context[last - (n - 1)]]
            if ends.size == 0:
                break
            if n >= self.min_ngram:
                best = ends
        if best is None or best.size == 0:
            return []
        start = int(best[-1]) + 1
        return context[start : start + k].tolist()
