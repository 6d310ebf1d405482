"""The peer comparison's arithmetic and reports: ratios against the better vLLM mode, the SLO
rate the served targets are judged at, text and markdown tables, and the latency plot."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import fmt

OFFLINE_TARGETS = {"tokens_per_s": 1.15, "cpu_s_per_token": 0.85}
SERVED_TARGETS = {"goodput_rps": 1.3, "ttft_p99_s": 0.7}
HOLDS_SLO = 0.9  # a system holds the SLO at a rate when this share of its requests met it
ITL_NOTE = (
    "ITL = TPOT per request: (e2e - TTFT) / (completion tokens - 1); chunk ITL = gaps between "
    "streamed chunks. Goodput = requests/s that met TTFT <= 1 s and ITL <= 100 ms."
)


@dataclasses.dataclass(slots=True)
class Table:
    title: str
    header: list[str]
    rows: list[list[str]]


def ratio(ours: float, theirs: float) -> float:
    """ours / theirs; infinite when only ours is positive, NaN when neither is."""
    if theirs == 0:
        return math.inf if ours > 0 else math.nan
    return ours / theirs


def better(modes: Mapping[str, Mapping[str, Any]], key: str, higher: bool) -> tuple[str, float]:
    """The mode with the best ``key`` (the largest when ``higher``) and that value."""
    pick = max if higher else min
    name = pick(modes, key=lambda m: modes[m][key])
    return name, modes[name][key]


def vllm_modes(results: Mapping[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in results.items() if name.startswith("vllm-")}


def offline_ratios(offline: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Manta over each peer; against vLLM, over its better mode for each metric separately."""
    manta = offline.get("manta")
    if manta is None:
        return {}
    out: dict[str, Any] = {}
    modes = vllm_modes(offline)
    if modes:
        tps_mode, tps = better(modes, "tokens_per_s", higher=True)
        cpu_mode, cpu = better(modes, "cpu_s_per_token", higher=False)
        out["vllm"] = {
            "tokens_per_s_vs": tps_mode,
            "tokens_per_s": ratio(manta["tokens_per_s"], tps),
            "cpu_s_per_token_vs": cpu_mode,
            "cpu_s_per_token": ratio(manta["cpu_s_per_token"], cpu),
        }
    if "transformers" in offline:
        peer = offline["transformers"]
        out["transformers"] = {
            "tokens_per_s": ratio(manta["tokens_per_s"], peer["tokens_per_s"]),
            "cpu_s_per_token": ratio(manta["cpu_s_per_token"], peer["cpu_s_per_token"]),
        }
    return out


def served_ratios(served: Mapping[str, Mapping[str, Any]]) -> dict[str, Any] | None:
    """Manta over vLLM's better mode at the highest rate where any of them holds the SLO."""
    modes = vllm_modes(served)
    if "manta" not in served or not modes:
        return None
    systems = {"manta": served["manta"], **modes}
    num_rates = min(len(s["rates"]) for s in systems.values())
    held = [
        i
        for i in range(num_rates)
        if any(s["rates"][i]["slo_attainment"] >= HOLDS_SLO for s in systems.values())
    ]
    if not held:
        return {"rate_index": None}
    i = held[-1]
    at = {name: s["rates"][i] for name, s in modes.items()}
    ours = served["manta"]["rates"][i]
    good_mode, good = better(at, "goodput_rps", higher=True)
    ttft_mode, ttft = better(at, "ttft_p99_s", higher=False)
    return {
        "rate_index": i,
        "offered_rate": ours["offered_rate"],
        "goodput_rps_vs": good_mode,
        "goodput_rps": ratio(ours["goodput_rps"], good),
        "ttft_p99_s_vs": ttft_mode,
        "ttft_p99_s": ratio(ours["ttft_p99_s"], ttft),
    }


# -- tables ------------------------------------------------------------------------------------
def met(value: float, target: float, higher: bool) -> str:
    if math.isnan(value):
        return "-"
    return "yes" if (value >= target if higher else value <= target) else "no"


def offline_table(offline: Mapping[str, Mapping[str, Any]]) -> Table:
    rows = []
    for name, s in offline.items():
        identical = (
            f"{s['identical_to_manta']}/{s['compared_requests']}"
            if "compared_requests" in s
            else "-"
        )
        rows.append([
            name,
            " ".join(fmt(r["tokens_per_s"]) for r in s["runs"]),
            fmt(s["tokens_per_s"]),
            fmt(s["cpu_s_per_run"]),
            fmt(s["cpu_s_per_token"] * 1e3),
            fmt(s["cores_busy"]),
            identical,
            fmt(s["start_s"]) if s["start_s"] else "-",
        ])  # fmt: skip
    header = ["system", "tok/s per run", "median tok/s", "CPU-s/run", "CPU-ms/token",
              "cores busy", "identical to Manta", "start s"]  # fmt: skip
    return Table("Offline: all requests at once, greedy, ignore_eos", header, rows)


def offline_target_table(ratios: Mapping[str, Any]) -> Table:
    rows = []
    if "vllm" in ratios:
        r = ratios["vllm"]
        for key, label in (("tokens_per_s", "output tok/s"), ("cpu_s_per_token", "CPU-s/token")):
            target, higher = OFFLINE_TARGETS[key], key == "tokens_per_s"
            sign = ">=" if higher else "<="
            rows.append([f"{label}, Manta / {r[key + '_vs']}", f"{r[key]:.3g}x",
                         f"{sign} {target}x", met(r[key], target, higher)])  # fmt: skip
    if "transformers" in ratios:
        r = ratios["transformers"]
        rows.append(["output tok/s, Manta / transformers", f"{r['tokens_per_s']:.3g}x", "-", "-"])
        rows.append(["CPU-s/token, Manta / transformers", f"{r['cpu_s_per_token']:.3g}x", "-", "-"])
    return Table(
        "Offline ratios (vLLM: its better mode per metric)",
        ["what", "ratio", "target", "met"],
        rows,
    )


def served_table(served: Mapping[str, Mapping[str, Any]]) -> Table:
    rows = []
    for name, s in served.items():
        for r in s["rates"]:
            ms = 1e3
            rows.append([
                name, fmt(r["offered_rate"]), fmt(r["requests_per_s"]),
                fmt(r["output_tokens_per_s"]),
                f"{fmt(r['ttft_p50_s'])} / {fmt(r['ttft_p99_s'])}",
                f"{fmt(r['tpot_p50_s'] * ms)} / {fmt(r['tpot_p99_s'] * ms)}",
                f"{fmt(r['chunk_itl_p50_s'] * ms)} / {fmt(r['chunk_itl_p99_s'] * ms)}",
                f"{fmt(r['e2e_p50_s'])} / {fmt(r['e2e_p99_s'])}",
                fmt(r["goodput_rps"]), f"{r['slo_attainment']:.0%}", str(r["errors"]),
                fmt(r["cpu_s_per_m_output_tokens"]), fmt(r["peak_rss_mib"]),
            ])  # fmt: skip
    header = ["system", "offered rps", "rps", "out tok/s", "TTFT p50/p99 s", "ITL p50/p99 ms",
              "chunk ITL p50/p99 ms", "e2e p50/p99 s", "goodput rps", "SLO met", "errors",
              "CPU-s/1M tok", "peak RSS MiB (sum)"]  # fmt: skip
    return Table("Served: Poisson arrivals, streamed /v1/completions", header, rows)


def served_target_table(comparison: Mapping[str, Any] | None) -> Table:
    header = ["what", "ratio", "target", "met"]
    title = "Served ratios (vLLM: its better mode per metric)"
    if comparison is None or comparison["rate_index"] is None:
        reason = "no rate where any system held the SLO" if comparison else "needs manta and vllm"
        return Table(title, header, [[reason, "-", "-", "-"]])
    c, rows = comparison, []
    for key, label in (("goodput_rps", "goodput"), ("ttft_p99_s", "p99 TTFT")):
        target, higher = SERVED_TARGETS[key], key == "goodput_rps"
        rows.append([f"{label} at {fmt(c['offered_rate'])} rps, Manta / {c[key + '_vs']}",
                     f"{c[key]:.3g}x", f"{'>=' if higher else '<='} {target}x",
                     met(c[key], target, higher)])  # fmt: skip
    return Table(title, header, rows)


def profile_table(profile: Mapping[str, Any]) -> Table:
    """Where one profiled offline run of Manta spends its time, by kind of work."""
    rows = [
        [kind, fmt(seconds * 1e3), f"{profile['share'][kind]:.0%}"]
        for kind, seconds in sorted(profile["seconds"].items(), key=lambda kv: -kv[1])
    ]
    title = f"Manta's offline run, profiled ({fmt(profile['wall_s'])} s under the profiler)"
    return Table(title, ["work", "ms", "share of wall time"], rows)


def all_tables(results: Mapping[str, Any]) -> list[Table]:
    """The tables of a comparison's results, leaving out those with nothing to compare."""
    tables = []
    if results["offline"]:
        tables.append(offline_table(results["offline"]))
        profile = results["offline"].get("manta", {}).get("profile")
        if profile:
            tables.append(profile_table(profile))
        if results["offline_ratios"]:
            tables.append(offline_target_table(results["offline_ratios"]))
    if results["served"]:
        tables.append(served_table(results["served"]))
        if results["served_ratios"] is not None:
            tables.append(served_target_table(results["served_ratios"]))
    return tables


def markdown(tables: Sequence[Table], notes: Sequence[str]) -> str:
    """The tables as GitHub markdown, after a bullet list of ``notes``."""
    lines = ["# Manta against its peers", "", *(f"- {note}" for note in notes)]
    for table in tables:
        lines += ["", f"## {table.title}", "", "| " + " | ".join(table.header) + " |"]
        lines.append("|" + "|".join(" --- " for _ in table.header) + "|")
        lines += [
            "| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in table.rows
        ]
    return "\n".join(lines) + "\n"


def write_plot(path: Path, served: Mapping[str, Mapping[str, Any]]) -> Path:
    """E2E (p50, p99) and TTFT (p50, p99) against achieved output tok/s, one line per system."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for (metric, title), ax in zip((("e2e", "end-to-end latency"), ("ttft", "TTFT")), axes):
        for color, (name, s) in zip(
            plt.rcParams["axes.prop_cycle"].by_key()["color"], served.items()
        ):
            x = [r["output_tokens_per_s"] for r in s["rates"]]
            for q, style in ((50, "-o"), (99, "--s")):
                y = [r[f"{metric}_p{q}_s"] for r in s["rates"]]
                ax.plot(x, y, style, color=color, label=f"{name} p{q}")
        ax.set(title=title, xlabel="achieved output tokens/s", ylabel="seconds", yscale="log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
