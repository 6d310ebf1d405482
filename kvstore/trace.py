"""The traffic trace format: one request a JSON line, token counts and timings only, never text.

`{"arrival_s": 0.31, "prompt_tokens": 412, "output_tokens": 96, "prefix_group": "sys-3",
"prefix_tokens": 256, "tenant": "t3", "priority": 0}`: requests of one `prefix_group` share
their first `prefix_tokens` tokens (`prefix_group` null for none). The router records its own
traffic in it, the simulator and the scheduling benchmark replay it, and the learned scheduler
is trained on it; it lives here because both the router and the workers read it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

FIELDS = (
    "arrival_s",
    "prompt_tokens",
    "output_tokens",
    "prefix_group",
    "prefix_tokens",
    "tenant",
    "priority",
)


@dataclass(frozen=True, slots=True)
class TraceRequest:
    arrival_s: float  # seconds from the start of the trace
    prompt_tokens: int
    output_tokens: int
    prefix_group: str | None = None
    prefix_tokens: int = 0  # leading prompt tokens shared by every request of the group
    tenant: str = "default"
    priority: int = 0  # lower runs first, as in the engine

    def __post_init__(self) -> None:
        number = isinstance(self.arrival_s, int | float) and not isinstance(self.arrival_s, bool)
        if not (number and math.isfinite(self.arrival_s)):
            raise ValueError(f"arrival_s must be a finite number, got {self.arrival_s!r}")
        if self.arrival_s < 0:
            raise ValueError(f"arrival_s must be >= 0, got {self.arrival_s}")
        for name in ("prompt_tokens", "output_tokens", "prefix_tokens", "priority"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if self.prompt_tokens < 1 or self.output_tokens < 1:
            raise ValueError("prompt_tokens and output_tokens must be >= 1")
        if not 0 <= self.prefix_tokens <= self.prompt_tokens:
            raise ValueError(
                f"prefix_tokens ({self.prefix_tokens}) must be within the prompt "
                f"({self.prompt_tokens} tokens)"
            )
        if self.prefix_group is None and self.prefix_tokens:
            raise ValueError("prefix_tokens without a prefix_group")
        if self.prefix_group is not None and not isinstance(self.prefix_group, str):
            raise ValueError(f"prefix_group must be a string or null, got {self.prefix_group!r}")
        if not isinstance(self.tenant, str):
            raise ValueError(f"tenant must be a string, got {self.tenant!r}")

    @classmethod
    def from_dict(cls, record: dict) -> TraceRequest:
        unknown = set(record) - set(FIELDS)
        if unknown:
            raise ValueError(f"unknown trace fields {sorted(unknown)}")
        missing = {"arrival_s", "prompt_tokens", "output_tokens"} - set(record)
        if missing:
            raise ValueError(f"missing trace fields {sorted(missing)}")
        return cls(**record)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))


def read_trace(path: str | Path) -> list[TraceRequest]:
    """Every request of a JSONL trace, in arrival order; a bad line raises ValueError naming it."""
    with open(path, encoding="utf-8") as f:
        requests = list(parse_lines(f, str(path)))
    return sorted(requests, key=lambda r: r.arrival_s)


def parse_lines(lines: Iterable[str], source: str = "trace") -> Iterator[TraceRequest]:
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("a line must be a JSON object")
            yield TraceRequest.from_dict(record)
        except (ValueError, TypeError) as error:
            raise ValueError(f"{source} line {number}: {error}") from None


def write_trace(path: str | Path, requests: Iterable[TraceRequest]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for request in requests:
            f.write(request.to_json() + "\n")


class TraceWriter:
    """Appends requests to a JSONL trace as they end, one flushed line each (a recording that
    stops abruptly loses at most the line being written)."""

    def __init__(self, path: str | Path) -> None:
        self._file: IO[str] = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close)

    def write(self, request: TraceRequest) -> None:
        self._file.write(request.to_json() + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
