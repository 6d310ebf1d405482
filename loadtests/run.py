"""Headless load test: run locust against a Manta server, then print and save a short summary.

    python -m loadtests.run --host http://127.0.0.1:8000 --users 8 --spawn-rate 4 \\
        --run-time 30s --out loadtests/report [--serve]

Writes locust's CSV files, `report.html`, `locust.log` and `summary.json` into `--out`; exits
non-zero when the failure ratio exceeds `--max-failure-ratio`. `--serve` starts `manta serve`
(the embedded tiny model) on the host's port first and stops it afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from urllib.error import URLError
from urllib.parse import urlsplit
from urllib.request import urlopen

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
KINDS = ("TTFT", "ITL")  # the token-latency request types the locustfile reports
PERCENTILES = (50, 95, 99)


def run_time_s(text: str) -> int:
    """Seconds in a locust run time such as `30s`, `2m`, `1h30m` or `45`."""
    if text.isdigit():
        return int(text)
    parts = re.fullmatch(r"(?:(\d+)h)?\s*(?:(\d+)m)?\s*(?:(\d+)s)?", text.strip())
    if not parts or not any(parts.groups()):
        raise argparse.ArgumentTypeError(f"bad run time {text!r} (e.g. 30s, 2m, 1h30m)")
    hours, minutes, seconds = (int(g or 0) for g in parts.groups())
    return hours * 3600 + minutes * 60 + seconds


def wait_healthy(host: str, server: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"manta serve exited with code {server.returncode}")
        with contextlib.suppress(URLError, OSError):
            with urlopen(f"{host}/health", timeout=2) as response:
                if response.status == 200:
                    return
        time.sleep(0.5)
    raise RuntimeError(f"{host}/health did not answer within {timeout_s:.0f} s")


def restore_sigint() -> None:
    """A shell starts background jobs with SIGINT ignored; the server must see it to stop."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextlib.contextmanager
def manta_server(host: str, workers: int, log_path: Path) -> Iterator[None]:
    """`manta serve` on the host's port for the duration of the block."""
    address = urlsplit(host)
    command = [sys.executable, "-m", "cluster.cli", "serve", "--workers", str(workers)]
    command += ["--host", address.hostname or "127.0.0.1", "--port", str(address.port or 8000)]
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group, Ray's processes included
            preexec_fn=restore_sigint,
        )
        try:
            wait_healthy(host, server, timeout_s=300)
            yield
        finally:
            server.send_signal(signal.SIGINT)  # `manta serve` shuts Serve and Ray down on it
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()


def run_locust(args: argparse.Namespace) -> None:
    """Run locust headless; raises if it fails or writes no stats."""
    command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless"]
    command += ["--host", args.host, "--users", str(args.users)]
    command += ["--spawn-rate", str(args.spawn_rate), "--run-time", f"{args.run_time}s"]
    command += ["--stop-timeout", str(args.stop_timeout), "--exit-code-on-error", "0"]
    command += ["--csv", str(args.out / "locust"), "--html", str(args.out / "report.html")]
    command += ["--json-file", str(args.out / "locust_stats")]  # final numbers; the CSV lags
    command += ["--only-summary", "--max-tokens", str(args.max_tokens), "--tenants"]
    command += [str(args.tenants)] + (["--model", args.model] if args.model else [])
    timeout_s = args.run_time + args.stop_timeout + 60
    log_path = args.out / "locust.log"
    with open(log_path, "w") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s)
    if code.returncode != 0 or not (args.out / "locust_stats.json").is_file():
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"locust exited with code {code.returncode}:\n{tail}")


def percentile(histogram: dict[float, int], fraction: float) -> float:
    """The smallest recorded time (ms) that at least `fraction` of the samples do not exceed."""
    total = sum(histogram.values())
    seen = 0
    for millis in sorted(histogram):
        seen += histogram[millis]
        if seen >= fraction * total:
            return millis
    return 0.0


def row(kind: str, name: str, entries: list[dict], duration_s: float) -> dict:
    """Counts and latency percentiles over one or more locust stats entries."""
    histogram: Counter[float] = Counter()
    for entry in entries:
        histogram.update({float(ms): n for ms, n in entry["response_times"].items()})
    count = sum(e["num_requests"] for e in entries)
    return {
        "type": kind,
        "name": name,
        "count": count,
        "failures": sum(e["num_failures"] for e in entries),
        **{f"p{p}": percentile(histogram, p / 100) for p in PERCENTILES},
        "rps": round(count / duration_s, 2),
    }


def summarize(stats_json: Path) -> dict:
    """Rows per locust entry and per kind (all requests, TTFT, ITL), and the totals."""
    entries = json.loads(stats_json.read_text())
    first = min((e["start_time"] for e in entries), default=0.0)
    last = max((e["last_request_timestamp"] or first for e in entries), default=0.0)
    duration_s = max(last - first, 1e-3)
    order = sorted(entries, key=lambda e: (e["name"], e["method"] in KINDS, e["method"] == "ITL"))
    rows = [row(e["method"], e["name"], [e], duration_s) for e in order]
    http = [e for e in entries if e["method"] not in KINDS]
    rows.append(row("all", "requests", http, duration_s))
    rows += [row("all", k, [e for e in entries if e["method"] == k], duration_s) for k in KINDS]
    total = rows[-len(KINDS) - 1]
    return {
        "requests": total["count"],
        "failures": total["failures"],
        "failure_ratio": total["failures"] / total["count"] if total["count"] else 1.0,
        "requests_per_s": total["rps"],
        "rows": rows,
    }


def format_table(summary: dict) -> str:
    head = f"{'type':<5} {'name':<22} {'count':>7} {'fails':>6}"
    lines = [head + "".join(f" {f'p{p} ms':>8}" for p in PERCENTILES) + f" {'req/s':>7}"]
    for r in summary["rows"]:
        line = f"{r['type']:<5} {r['name']:<22} {r['count']:>7} {r['failures']:>6}"
        line += "".join(f" {r[f'p{p}']:>8.0f}" for p in PERCENTILES)
        lines.append(line + f" {r['rps']:>7.2f}")
    lines.append(
        f"{summary['requests']} requests, {summary['failures']} failures "
        f"({summary['failure_ratio']:.1%}), {summary['requests_per_s']} requests/s"
    )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtests.run", description=__doc__)
    parser.add_argument("--host", default="http://127.0.0.1:8000")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--spawn-rate", type=float, default=4.0)
    parser.add_argument("--run-time", type=run_time_s, default="30s", help="e.g. 30s, 2m")
    parser.add_argument("--out", type=Path, default=Path("loadtests/report"))
    parser.add_argument("--model", default="", help="model name (default: the server's)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--tenants", type=int, default=4)
    parser.add_argument("--stop-timeout", type=int, default=10, help="seconds to finish requests")
    parser.add_argument("--max-failure-ratio", type=float, default=0.01)
    parser.add_argument("--serve", action="store_true", help="start `manta serve` first")
    parser.add_argument("--workers", type=int, default=2, help="workers for --serve")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.host = args.host.rstrip("/")
    args.out.mkdir(parents=True, exist_ok=True)
    server = manta_server(args.host, args.workers, args.out / "serve.log")
    with server if args.serve else contextlib.nullcontext():
        run_locust(args)
    summary = summarize(args.out / "locust_stats.json")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(format_table(summary))
    print(f"report: {args.out / 'report.html'}")
    if summary["failure_ratio"] > args.max_failure_ratio:
        failures = args.out / "locust_failures.csv"
        print(f"failure ratio above {args.max_failure_ratio:.1%}: see {failures}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
