"""Public LLM-serving traces converted to Manta's trace format (token counts and arrivals only).

BurstGPT (CSV, github.com/HPMLL/BurstGPT), the Azure LLM inference traces (CSV, 2023 and 2024
releases, github.com/Azure/AzurePublicDataset) and Mooncake (JSONL, github.com/kvcache-ai/
Mooncake). Every importer re-bases arrivals to start at 0, skips rows with zero prompt or
output tokens (BurstGPT logs its failed requests that way), keeps the first `limit` requests
it does not skip, and raises ValueError naming the file, line and column of a malformed row.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from kvstore.trace import TraceRequest

MOONCAKE_BLOCK_TOKENS = 512  # the tokens behind one Mooncake hash id
_EPOCH = datetime(1970, 1, 1)
# Azure's TIMESTAMP: "2023-11-16 18:15:46.6805900" (7 fractional digits, more than datetime
# parses), the 2024 release with an offset such as "+00:00".
_AZURE_TIME = re.compile(r"(\d{4}-\d{2}-\d{2})[ T](\d{2}:\d{2}:\d{2})(\.\d+)?(Z|[+-]\d{2}:?\d{2})?")


@dataclass(slots=True)
class _Row:
    arrival_s: float  # in the file's own clock
    prompt_tokens: int
    output_tokens: int
    hash_ids: list[int] = field(default_factory=list)


# -- parsing one field --------------------------------------------------------------------------
def _where(path: str | Path, line: int, column: str) -> str:
    return f"{path} line {line}, column {column!r}"


def _count(value: object, where: str) -> int:
    """A token count: a whole number >= 0, as CSV text or a JSON integer."""
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            pass
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{where}: expected a token count (a whole number >= 0), got {value!r}")
    return value


def _seconds(value: object, where: str) -> float:
    """A finite number of seconds, as CSV text or a JSON number."""
    try:
        number = float(value) if isinstance(value, str | int | float) else math.nan
    except ValueError:
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number):
        raise ValueError(f"{where}: expected a number, got {value!r}")
    return number


def _azure_seconds(text: str | None, where: str) -> float:
    """Seconds since the epoch of an Azure TIMESTAMP (UTC when it names no offset)."""
    match = _AZURE_TIME.fullmatch((text or "").strip())
    if match is None:
        raise ValueError(f"{where}: expected a time like 2023-11-16 18:15:46.6805900, got {text!r}")
    date, clock, fraction, offset = match.groups()
    try:
        seconds = (datetime.fromisoformat(f"{date}T{clock}") - _EPOCH).total_seconds()
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    if offset and offset != "Z":
        sign = -1 if offset[0] == "-" else 1
        hours, minutes = int(offset[1:3]), int(offset[-2:])
        seconds -= sign * timedelta(hours=hours, minutes=minutes).total_seconds()
    return seconds + (float(fraction) if fraction else 0.0)


# -- reading files ------------------------------------------------------------------------------
def _csv_records(path: str | Path, columns: tuple[str, ...]) -> Iterator[tuple[int, dict]]:
    """`(line number, row)` of a CSV file whose header holds `columns` (others are ignored)."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in columns if c not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"{path} line 1: missing columns {missing} in {reader.fieldnames}")
        try:
            for row in reader:
                yield reader.line_num, row
        except csv.Error as error:
            raise ValueError(f"{path} line {reader.line_num}: {error}") from None


def _kept(rows: Iterator[_Row], limit: int | None) -> list[_Row]:
    """The first `limit` rows with tokens on both sides (zero-token rows are skipped), sorted by
    arrival; the rest of the file is not read."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    with_tokens = (row for row in rows if row.prompt_tokens and row.output_tokens)
    return sorted(itertools.islice(with_tokens, limit), key=lambda r: r.arrival_s)


def _requests(
    rows: list[_Row], groups: list[tuple[str | None, int]] | None = None
) -> list[TraceRequest]:
    """Requests of `rows` (sorted by arrival), the first arriving at 0."""
    start = rows[0].arrival_s if rows else 0.0
    groups = groups or [(None, 0)] * len(rows)
    return [
        TraceRequest(round(r.arrival_s - start, 6), r.prompt_tokens, r.output_tokens, group, shared)
        for r, (group, shared) in zip(rows, groups)
    ]


# -- the formats --------------------------------------------------------------------------------
def import_burstgpt(path: str | Path, limit: int | None = None) -> list[TraceRequest]:
    """BurstGPT's CSV (`Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type`,
    Timestamp in seconds); every request of tenant "default"."""

    def rows() -> Iterator[_Row]:
        columns = ("Timestamp", "Request tokens", "Response tokens")
        for line, row in _csv_records(path, columns):
            yield _Row(
                _seconds(row["Timestamp"], _where(path, line, "Timestamp")),
                _count(row["Request tokens"], _where(path, line, "Request tokens")),
                _count(row["Response tokens"], _where(path, line, "Response tokens")),
            )

    return _requests(_kept(rows(), limit))


def import_azure(path: str | Path, limit: int | None = None) -> list[TraceRequest]:
    """An Azure LLM inference trace CSV (`TIMESTAMP,ContextTokens,GeneratedTokens`, 2023 and 2024
    releases; TIMESTAMP a date and time such as `2023-11-16 18:15:46.6805900`)."""

    def rows() -> Iterator[_Row]:
        for line, row in _csv_records(path, ("TIMESTAMP", "ContextTokens", "GeneratedTokens")):
            yield _Row(
                _azure_seconds(row["TIMESTAMP"], _where(path, line, "TIMESTAMP")),
                _count(row["ContextTokens"], _where(path, line, "ContextTokens")),
                _count(row["GeneratedTokens"], _where(path, line, "GeneratedTokens")),
            )

    return _requests(_kept(rows(), limit))


def _mooncake_row(path: str | Path, line: int, text: str) -> _Row:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} line {line}: not JSON ({error})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path} line {line}: a line must be a JSON object")
    missing = [k for k in ("timestamp", "input_length", "output_length") if k not in record]
    if missing:
        raise ValueError(f"{path} line {line}: missing fields {missing}")
    hash_ids = record.get("hash_ids", [])
    if not isinstance(hash_ids, list) or not all(
        isinstance(h, int) and not isinstance(h, bool) for h in hash_ids
    ):
        raise ValueError(f"{_where(path, line, 'hash_ids')}: expected a list of integers")
    return _Row(
        _seconds(record["timestamp"], _where(path, line, "timestamp")) / 1000,
        _count(record["input_length"], _where(path, line, "input_length")),
        _count(record["output_length"], _where(path, line, "output_length")),
        hash_ids,
    )


def _common_blocks(a: list[int], b: list[int]) -> int:
    """How many leading hash ids `a` and `b` share."""
    shared = 0
    for x, y in zip(a, b):
        if x != y:
            break
        shared += 1
    return shared


def _mooncake_groups(rows: list[_Row]) -> list[tuple[str | None, int]]:
    """`(prefix_group, prefix_tokens)` of each row (sorted by arrival): see `import_mooncake`."""
    members: dict[int, list[int]] = {}
    for i, row in enumerate(rows):
        if row.hash_ids:
            members.setdefault(row.hash_ids[0], []).append(i)
    groups: list[tuple[str | None, int]] = [(None, 0)] * len(rows)
    for first_id, indices in members.items():
        if len(indices) < 2:
            continue
        head = rows[indices[0]]
        shared = {
            i: min(
                MOONCAKE_BLOCK_TOKENS * _common_blocks(head.hash_ids, rows[i].hash_ids),
                rows[i].prompt_tokens,
                head.prompt_tokens,
            )
            for i in indices[1:]
        }
        shared[indices[0]] = max(shared.values())
        for i, tokens in shared.items():
            groups[i] = (f"mooncake-{first_id}", tokens)
    return groups


def import_mooncake(path: str | Path, limit: int | None = None) -> list[TraceRequest]:
    """Mooncake's JSONL (`{"timestamp": ms, "input_length", "output_length", "hash_ids"}`, each
    hash id one block of 512 tokens, equal ids meaning equal blocks).

    Prefix groups: requests whose first hash id is the same form group "mooncake-<id>" (a first
    id seen only once forms none). The group's earliest request is its reference: each later
    member shares 512 tokens for every leading hash id it has in common with it (capped by both
    prompts), and the reference itself the most any member shares. Branches that diverge from
    the reference and meet again later are not seen: a group is one shared token sequence.
    """

    def rows() -> Iterator[_Row]:
        with open(path, encoding="utf-8") as f:
            for line, text in enumerate(f, 1):
                if text.strip():
                    yield _mooncake_row(path, line, text)

    kept = _kept(rows(), limit)
    return _requests(kept, _mooncake_groups(kept))


IMPORTERS: dict[str, Callable[..., list[TraceRequest]]] = {
    "burstgpt": import_burstgpt,
    "azure": import_azure,
    "mooncake": import_mooncake,
}
