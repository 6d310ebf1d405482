"""Helpers shared by the benchmark tests."""

from __future__ import annotations

from typing import Any


def numbers(value: Any) -> list[float]:
    """Every number inside a JSON value."""
    if isinstance(value, dict):
        return [x for v in value.values() for x in numbers(v)]
    if isinstance(value, list):
        return [x for v in value for x in numbers(v)]
    if isinstance(value, bool) or not isinstance(value, int | float):
        return []
    return [value]
