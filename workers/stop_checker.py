"""Stop-string detection over a request's streamed text, linear in the text and the strings."""

from __future__ import annotations


def _failure(pattern: str) -> list[int]:
    """Knuth-Morris-Pratt: for each prefix length k, the longest proper border of pattern[:k]."""
    fail = [0] * (len(pattern) + 1)
    border = 0
    for i in range(1, len(pattern)):
        while border and pattern[i] != pattern[border]:
            border = fail[border]
        if pattern[i] == pattern[border]:
            border += 1
        fail[i + 1] = border
    return fail


class StopChecker:
    """Cuts one request's streamed text at its first stop string.

    Text is released only once no stop string can start inside it, so a partial stop string
    never reaches the client. The first stop string is the one that ends earliest (the
    longest among those ending together), which makes the output independent of how the
    text was split into deltas. Each stop string runs a KMP automaton over the stream: its
    state is the longest prefix of the string that the text ends with, so a character costs
    amortised O(1) per stop string and memory is linear in their lengths (never every prefix).
    """

    def __init__(self, stop: list[str], include_stop_str_in_output: bool = False) -> None:
        if not all(stop):
            raise ValueError(f"stop strings must be non-empty, got {stop!r}")
        self._stop = list(stop)
        self._fail = [_failure(s) for s in self._stop]
        self._state = [0] * len(self._stop)  # matched prefix length of each stop string
        self._include = include_stop_str_in_output
        self._held = ""
        self.stopped = False
        self.stop_str: str | None = None  # the stop string that ended the text, once stopped

    def push(self, delta: str) -> tuple[str, bool]:
        """Feeds the next delta; returns (text safe to emit now, whether a stop string hit)."""
        if self.stopped:
            return "", True
        text = self._held + delta
        offset = len(self._held)
        for i, char in enumerate(delta, offset + 1):
            hit = self._advance(char)
            if hit is not None:
                self.stopped = True
                self.stop_str = hit
                self._held = ""
                start = i - len(hit)
                return text[: i if self._include else start], True
        keep = max(self._state, default=0)  # the longest partial match must stay held
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """Releases the held-back tail when the request ends for another reason."""
        text, self._held = self._held, ""
        return text

    def _advance(self, char: str) -> str | None:
        """Step every automaton by one character; the longest stop string completed, if any."""
        hit = None
        for j, (pattern, fail) in enumerate(zip(self._stop, self._fail)):
            k = self._state[j]
            while k and pattern[k] != char:
                k = fail[k]
            if pattern[k] == char:
                k += 1
            if k == len(pattern):
                if hit is None or len(pattern) > len(hit):
                    hit = pattern
                k = fail[k]
            self._state[j] = k
        return hit
