"""What `GET /status` answers and `manta status` prints: each worker's load and cache figures
from its last report, and the prefix index's health."""

from __future__ import annotations

import math

from router.metrics import worker_name


def _number(report: dict, key: str) -> float:
    value = report.get(key, 0)  # a report is data from another process: never trusted
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else 0.0


def _ratio(report: dict, part: str, whole: str) -> float | None:
    total = _number(report, whole)
    return _number(report, part) / total if total else None


def worker_row(worker_id: str, report: dict) -> dict:
    device, node = report.get("device"), report.get("node_id")
    return {
        "worker": worker_name(report) or worker_id,
        "node_id": node if isinstance(node, str) else None,
        "device": device if isinstance(device, str) else "?",
        "running": int(_number(report, "num_requests_running")),
        "waiting": int(_number(report, "num_requests_waiting")),
        "kv_usage": _number(report, "kv_cache_usage"),
        "prefix_hit_rate": _ratio(report, "prefix_cache_hits", "prefix_cache_queries"),
        "spec_acceptance": _ratio(
            report, "spec_decode_accepted_tokens", "spec_decode_proposed_tokens"
        ),
    }


def status(model: str, reports: dict[str, dict], index: dict) -> dict:
    workers = [worker_row(w, r) for w, r in reports.items() if isinstance(r, dict)]
    return {"model": model, "workers": sorted(workers, key=lambda row: row["worker"]),
            "prefix_index": index}  # fmt: skip


def render(answer: dict) -> str:
    """The terminal table of a `/status` answer."""

    def pct(x) -> str:
        return "-" if x is None else f"{100 * x:.0f}%"

    header = ["worker", "device", "running", "waiting", "KV used", "prefix hits", "spec accepted"]
    rows = [
        [w["worker"], w["device"], str(w["running"]), str(w["waiting"]), pct(w["kv_usage"]),
         pct(w["prefix_hit_rate"]), pct(w["spec_acceptance"])]
        for w in answer.get("workers", [])
    ]  # fmt: skip
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [f"model {answer.get('model', '?')}: {len(rows)} worker(s)"]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
              for row in [header, *rows]]  # fmt: skip
    index = answer.get("prefix_index", {})
    health = "reachable" if index.get("reachable") else "NOT reachable"
    held = index.get("entries")
    size = "?" if held is None else f"{held} block entries over {index.get('workers')} worker(s)"
    lines.append(f"prefix index: {index.get('backend', '?')}, {health}, {size}")
    return "\n".join(lines)
