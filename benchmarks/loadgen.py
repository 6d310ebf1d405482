"""An async streaming load generator for OpenAI-compatible servers, and its SLO accounting.

Each request is sent at its arrival time as a streamed `POST /v1/completions` of token ids
(greedy, `ignore_eos`, usage in the last chunk), so any server that speaks vLLM's dialect of
the protocol gets exactly the same load. Every request ends as a `RequestResult`; failures
(non-200, an error chunk, a stream that breaks or ends early) are kept and counted, never
dropped. ITL per request is TPOT: (e2e - TTFT) / (completion tokens - 1).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import math
import time
from collections.abc import Sequence
from typing import Any

import httpx
import numpy as np

from benchmarks.common import sse_lines


@dataclasses.dataclass(slots=True)
class LoadRequest:
    """One request of a replay: when it is sent (seconds from the start) and what it asks."""

    arrival_s: float
    prompt_ids: list[int]
    max_tokens: int


@dataclasses.dataclass(slots=True)
class RequestResult:
    """What happened to one request; times are seconds from the moment it was sent."""

    arrival_s: float
    max_tokens: int
    error: str | None = None  # None: a complete, well-formed stream
    ttft_s: float = math.nan
    e2e_s: float = math.nan
    completion_tokens: int = 0
    chunk_times_s: list[float] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def tpot_s(self) -> float:
        """Mean time per output token after the first; NaN with fewer than two tokens."""
        if self.completion_tokens < 2:
            return math.nan
        return (self.e2e_s - self.ttft_s) / (self.completion_tokens - 1)

    def chunk_gaps_s(self) -> list[float]:
        """Gaps between successive streamed chunks (a chunk may carry several tokens)."""
        times = self.chunk_times_s
        return [b - a for a, b in zip(times, times[1:])]


@dataclasses.dataclass(slots=True)
class LoadRun:
    """Every request's result and the wall time from the first send to the last response."""

    results: list[RequestResult]
    duration_s: float


@dataclasses.dataclass(frozen=True, slots=True)
class Slo:
    """A request is good when its TTFT and its TPOT are both within these bounds."""

    ttft_s: float = 1.0
    tpot_s: float = 0.1

    def met(self, result: RequestResult) -> bool:
        if not result.ok or result.ttft_s > self.ttft_s:
            return False
        return math.isnan(result.tpot_s) or result.tpot_s <= self.tpot_s


def completion_body(model: str, request: LoadRequest) -> dict[str, Any]:
    """The request body: greedy, every token generated, usage reported in the last chunk."""
    return {
        "model": model,
        "prompt": request.prompt_ids,
        "max_tokens": request.max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def send(
    client: httpx.AsyncClient, url: str, model: str, request: LoadRequest
) -> RequestResult:
    """Stream one completion, timing every chunk that carries a choice."""
    result = RequestResult(request.arrival_s, request.max_tokens)
    start = time.perf_counter()
    done = False
    try:
        async with client.stream("POST", url, json=completion_body(model, request)) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                result.error = f"http {response.status_code}: {text[:200]}"
                return result
            async for line in sse_lines(response):
                if not line.startswith("data:"):
                    continue
                payload = line[len("data:") :].strip()
                if payload == "[DONE]":
                    done = True
                    break
                chunk = json.loads(payload)
                if "error" in chunk:
                    result.error = f"error chunk: {str(chunk['error'])[:200]}"
                    return result
                if chunk.get("choices"):
                    result.chunk_times_s.append(time.perf_counter() - start)
                if chunk.get("usage"):
                    result.completion_tokens = int(chunk["usage"]["completion_tokens"])
    except (httpx.HTTPError, json.JSONDecodeError, KeyError, ValueError) as error:
        result.error = f"stream broken: {type(error).__name__}: {error}"[:300]
        return result
    result.e2e_s = time.perf_counter() - start
    if result.chunk_times_s:
        result.ttft_s = result.chunk_times_s[0]
    if not done:
        result.error = "stream ended without [DONE]"
    elif not result.chunk_times_s:
        result.error = "no tokens streamed"
    elif result.completion_tokens != request.max_tokens:
        result.error = f"usage says {result.completion_tokens} tokens, asked {request.max_tokens}"
    return result


async def replay(
    base_url: str, model: str, requests: Sequence[LoadRequest], timeout_s: float = 600.0
) -> LoadRun:
    """Send every request at its arrival time (one connection each) and wait for all."""
    url = base_url.rstrip("/") + "/v1/completions"
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), limits=limits) as client:
        start = time.perf_counter()

        async def at_arrival(request: LoadRequest) -> RequestResult:
            await asyncio.sleep(max(0.0, request.arrival_s - (time.perf_counter() - start)))
            return await send(client, url, model, request)

        results = await asyncio.gather(*(at_arrival(r) for r in requests))
        return LoadRun(list(results), time.perf_counter() - start)


def run_load(
    base_url: str, model: str, requests: Sequence[LoadRequest], timeout_s: float = 600.0
) -> LoadRun:
    """`replay` from synchronous code."""
    return asyncio.run(replay(base_url, model, requests, timeout_s))


# -- accounting --------------------------------------------------------------------------------
def pct(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100, linear interpolation) of the finite values; NaN if none."""
    finite = [v for v in values if not math.isnan(v)]
    return float(np.percentile(np.asarray(finite, dtype=np.float64), q)) if finite else math.nan


def summarize(run: LoadRun, slo: Slo) -> dict[str, Any]:
    """Throughput, latency percentiles, goodput and errors of one replay.

    Latencies are over the successful requests; goodput counts the requests that succeeded
    within the SLO, per second of the run, and `slo_attainment` is their share of all requests.
    """
    results, duration = run.results, run.duration_s
    ok = [r for r in results if r.ok]
    good = sum(slo.met(r) for r in results)
    tokens = sum(r.completion_tokens for r in ok)
    gaps = [gap for r in ok for gap in r.chunk_gaps_s()]
    errors = collections.Counter(r.error.split(":")[0] for r in results if not r.ok)
    stats: dict[str, Any] = {
        "requests": len(results),
        "succeeded": len(ok),
        "errors": len(results) - len(ok),
        "error_kinds": dict(errors),
        "duration_s": duration,
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / duration if duration > 0 else math.nan,
        "requests_per_s": len(ok) / duration if duration > 0 else math.nan,
        "goodput_rps": good / duration if duration > 0 else math.nan,
        "slo_attainment": good / len(results) if results else math.nan,
    }
    series = {
        "ttft": [r.ttft_s for r in ok],
        "tpot": [r.tpot_s for r in ok],
        "e2e": [r.e2e_s for r in ok],
        "chunk_itl": gaps,
    }
    for name, values in series.items():
        for q in (50, 99):
            stats[f"{name}_p{q}_s"] = pct(values, q)
    return stats
