"""Stop-string detection over a request's streamed text."""

from __future__ import annotations


class StopChecker:
    """Cuts one request's streamed text at its first stop string.

    Text is released only once no stop string can start inside it, so a partial stop string
    never reaches the client. The first stop string is the one that ends earliest (the
    longest among those ending together), which makes the output independent of how the
    text was split into deltas. Each push scans only the held-back tail plus the new delta.
    """

    def __init__(self, stop: list[str], include_stop_str_in_output: bool = False) -> None:
        if not all(stop):
            raise ValueError(f"stop strings must be non-empty, got {stop!r}")
        self._stop = list(stop)
        self._include = include_stop_str_in_output
        self._prefixes = frozenset(s[:end] for s in stop for end in range(1, len(s)))
        self._max_prefix_len = max((len(s) - 1 for s in stop), default=0)
        self._held = ""
        self.stopped = False
        self.stop_str: str | None = None  # the stop string that ended the text, once stopped

    def push(self, delta: str) -> tuple[str, bool]:
        """Feeds the next delta; returns (text safe to emit now, whether a stop string hit)."""
        if self.stopped:
            return "", True
        text = self._held + delta
        match = self._first_match(text)
        if match is not None:
            start, stop_str = match
            self.stopped = True
            self.stop_str = stop_str
            self._held = ""
            return text[: start + len(stop_str) if self._include else start], True
        keep_from = self._held_back_start(text)
        self._held = text[keep_from:]
        return text[:keep_from], False

    def flush(self) -> str:
        """Releases the held-back tail when the request ends for another reason."""
        text, self._held = self._held, ""
        return text

    def _first_match(self, text: str) -> tuple[int, str] | None:
        """(start, stop string) of the earliest-ending stop string in text, if any."""
        best: tuple[int, int, str] | None = None
        for stop_str in self._stop:
            start = text.find(stop_str)
            if start < 0:
                continue
            end = start + len(stop_str)
            if best is None or (end, start) < (best[0], best[1]):
                best = (end, start, stop_str)
        return None if best is None else (best[1], best[2])

    def _held_back_start(self, text: str) -> int:
        """Index of the earliest suffix of text that could still grow into a stop string."""
        for start in range(max(0, len(text) - self._max_prefix_len), len(text)):
            if text[start:] in self._prefixes:
                return start
        return len(text)
