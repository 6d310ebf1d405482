"""Synthetic traffic traces, and the command line that writes them or imports public ones.

Five families, each a plain function of a duration (s), a mean rate (requests/s) and a seed,
returning `TraceRequest`s in arrival order: steady Poisson, diurnal (a sinusoidal rate), bursty
(calm stretches and surges of 5-10x: a launch going viral), heavy-tailed (gamma inter-arrivals
burstier than Poisson and long-tailed lengths, the shape published for BurstGPT and the Azure
LLM inference traces) and shared-prefix (a few popular system prompts). Token counts are
lognormal around the requested means, clipped to caps, so a trace can be sized for a tiny model.

    python -m benchmarks.traces generate bursty --duration 60 --rate 12 --seed 0 --out t.jsonl
    python -m benchmarks.traces import burstgpt BurstGPT_1.csv --out t.jsonl --limit 5000
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import numpy as np

from benchmarks.trace_import import IMPORTERS
from kvstore.trace import TraceRequest, write_trace

STEADY_SIGMA = 0.5  # lognormal spread of token counts in every family but heavy_tailed


# -- shared pieces ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class TraceSizes:
    """What every family draws alike: token-count means (before clipping) and caps, and how
    many tenants share the traffic (None: all "default")."""

    prompt_tokens: int = 256
    output_tokens: int = 64
    max_prompt_tokens: int = 1024
    max_output_tokens: int = 256
    num_tenants: int | None = None


DEFAULT_SIZES = TraceSizes()


def _check(duration_s: float, rate: float) -> None:
    if not (duration_s > 0 and rate > 0):
        raise ValueError(f"duration_s and rate must be > 0, got {duration_s} and {rate}")


def _check_range(name: str, low_high: tuple[float, float], minimum: float) -> None:
    low, high = low_high
    if not minimum <= low <= high:
        raise ValueError(f"{name} must be a (low, high) range with {minimum} <= low <= high")


def _poisson_arrivals(
    rng: np.random.Generator, start: float, length: float, rate: float
) -> np.ndarray:
    """A homogeneous Poisson process on [start, start + length): a Poisson count, uniform times."""
    count = rng.poisson(rate * length)
    return np.sort(rng.uniform(start, start + length, count))


def _lengths(rng: np.random.Generator, n: int, mean: float, cap: int, sigma: float) -> list[int]:
    """`n` lognormal token counts with mean `mean` before clipping to [1, cap]."""
    if mean < 1 or cap < 1:
        raise ValueError(f"token means and caps must be >= 1, got mean {mean} and cap {cap}")
    mu = math.log(mean) - sigma**2 / 2  # the lognormal's mean is exp(mu + sigma^2 / 2)
    return np.clip(np.rint(rng.lognormal(mu, sigma, n)), 1, cap).astype(np.int64).tolist()


def _tenants(rng: np.random.Generator, n: int, num_tenants: int | None) -> list[str]:
    """Tenants "t0".."tN-1" uniformly at random, or "default" for all without `num_tenants`."""
    if num_tenants is None:
        return ["default"] * n
    if num_tenants < 1:
        raise ValueError(f"num_tenants must be >= 1, got {num_tenants}")
    return [f"t{i}" for i in rng.integers(0, num_tenants, n).tolist()]


def _trace(
    rng: np.random.Generator,
    arrivals: np.ndarray,
    sizes: TraceSizes,
    sigma: tuple[float, float] = (STEADY_SIGMA, STEADY_SIGMA),
) -> list[TraceRequest]:
    """Requests at `arrivals` with token counts and tenants drawn as `sizes` says."""
    n = len(arrivals)
    prompts = _lengths(rng, n, sizes.prompt_tokens, sizes.max_prompt_tokens, sigma[0])
    outputs = _lengths(rng, n, sizes.output_tokens, sizes.max_output_tokens, sigma[1])
    tenants = _tenants(rng, n, sizes.num_tenants)
    return [
        TraceRequest(round(t, 6), p, o, tenant=tenant)
        for t, p, o, tenant in zip(arrivals.tolist(), prompts, outputs, tenants)
    ]


# -- the families -------------------------------------------------------------------------------
def poisson(
    duration_s: float,
    rate: float,
    *,
    seed: int = 0,
    sizes: TraceSizes = DEFAULT_SIZES,
) -> list[TraceRequest]:
    """Steady Poisson arrivals at `rate`: the memoryless baseline the other families depart from."""
    _check(duration_s, rate)
    rng = np.random.default_rng(seed)
    arrivals = _poisson_arrivals(rng, 0.0, duration_s, rate)
    return _trace(rng, arrivals, sizes)


def diurnal(
    duration_s: float,
    rate: float,
    *,
    period_s: float | None = None,
    amplitude: float = 0.5,
    seed: int = 0,
    sizes: TraceSizes = DEFAULT_SIZES,
) -> list[TraceRequest]:
    """A Poisson process whose rate is `rate * (1 + amplitude * sin(2 pi t / period_s))`, drawn by
    thinning; the mean is `rate` over whole periods (`period_s` defaults to the duration)."""
    _check(duration_s, rate)
    period = duration_s if period_s is None else period_s
    if not (0 <= amplitude <= 1 and period > 0):
        raise ValueError(f"need 0 <= amplitude <= 1 and period_s > 0, got {amplitude}, {period}")
    rng = np.random.default_rng(seed)
    peak = rate * (1 + amplitude)
    candidates = _poisson_arrivals(rng, 0.0, duration_s, peak)
    wanted = rate * (1 + amplitude * np.sin(2 * np.pi * candidates / period))
    arrivals = candidates[rng.uniform(0, peak, candidates.size) < wanted]
    return _trace(rng, arrivals, sizes)


def _surge_schedule(
    rng: np.random.Generator,
    duration_s: float,
    surge_factor: tuple[float, float],
    surge_len_s: tuple[float, float],
    calm_len_s: tuple[float, float],
) -> list[tuple[float, float, float]]:
    """Alternating calm and surge segments `(start, length, rate factor)`, calm first."""
    segments, start, surge = [], 0.0, False
    while start < duration_s:
        length = min(rng.uniform(*(surge_len_s if surge else calm_len_s)), duration_s - start)
        factor = rng.uniform(*surge_factor) if surge else 1.0
        segments.append((start, length, factor))
        start, surge = start + length, not surge
    return segments


def bursty(
    duration_s: float,
    rate: float,
    *,
    surge_factor: tuple[float, float] = (5.0, 10.0),
    surge_len_s: tuple[float, float] = (2.0, 6.0),
    calm_len_s: tuple[float, float] = (5.0, 15.0),
    seed: int = 0,
    sizes: TraceSizes = DEFAULT_SIZES,
) -> list[TraceRequest]:
    """The viral launch: a two-state modulated Poisson process, calm stretches and surges whose
    factor over the calm rate is drawn per surge, each stretch's length uniform in its range.

    `rate` is the mean over the whole trace: the calm rate is set so that the expected count over
    the drawn calm/surge schedule is `rate * duration_s` (the calm rate itself is lower).
    """
    _check(duration_s, rate)
    _check_range("surge_factor", surge_factor, 1.0)
    _check_range("surge_len_s", surge_len_s, 1e-3)
    _check_range("calm_len_s", calm_len_s, 1e-3)
    rng = np.random.default_rng(seed)
    segments = _surge_schedule(rng, duration_s, surge_factor, surge_len_s, calm_len_s)
    calm_rate = rate * duration_s / sum(length * factor for _, length, factor in segments)
    arrivals = np.concatenate(
        [_poisson_arrivals(rng, s, length, calm_rate * f) for s, length, f in segments]
    )
    return _trace(rng, arrivals, sizes)


def _renewal_arrivals(
    rng: np.random.Generator, duration_s: float, rate: float, shape: float
) -> np.ndarray:
    """Arrivals on [0, duration_s) with gamma(shape) gaps of mean 1 / rate (CV 1 / sqrt(shape))."""
    chunks, last = [], 0.0
    while last < duration_s:
        gaps = rng.gamma(shape, 1 / (rate * shape), max(16, int(rate * duration_s)))
        chunks.append(last + np.cumsum(gaps))
        last = chunks[-1][-1]
    arrivals = np.concatenate(chunks)
    return arrivals[arrivals < duration_s]


def heavy_tailed(
    duration_s: float,
    rate: float,
    *,
    shape: float = 0.25,
    prompt_sigma: float = 1.0,
    output_sigma: float = 1.0,
    seed: int = 0,
    sizes: TraceSizes = DEFAULT_SIZES,
) -> list[TraceRequest]:
    """Gamma inter-arrivals with `shape` < 1 (clusters of near-simultaneous requests between long
    gaps) and lognormal token counts with wide spreads, whose means hold before the caps clip."""
    _check(duration_s, rate)
    if not 0 < shape < 1:
        raise ValueError(f"shape must be within (0, 1) to be burstier than Poisson, got {shape}")
    rng = np.random.default_rng(seed)
    arrivals = _renewal_arrivals(rng, duration_s, rate, shape)
    return _trace(rng, arrivals, sizes, (prompt_sigma, output_sigma))


def shared_prefix(
    duration_s: float,
    rate: float,
    *,
    num_groups: int = 4,
    prefix_tokens: int | None = None,
    grouped_fraction: float = 0.8,
    zipf_s: float = 1.2,
    seed: int = 0,
    sizes: TraceSizes = DEFAULT_SIZES,
) -> list[TraceRequest]:
    """Poisson arrivals of which `grouped_fraction` open with one of `num_groups` system prompts
    ("sys-0" the most popular, group k drawn with weight (k + 1)^-zipf_s) of `prefix_tokens`
    tokens (default: half of `prompt_tokens`), followed by their own part; the prompt mean
    holds for both kinds. With tenants, group k belongs to tenant k % num_tenants, since tenants
    never share cached KV."""
    _check(duration_s, rate)
    prompt_tokens, max_prompt_tokens = sizes.prompt_tokens, sizes.max_prompt_tokens
    prefix = prompt_tokens // 2 if prefix_tokens is None else prefix_tokens
    if not 1 <= prefix <= prompt_tokens or prefix >= max_prompt_tokens:
        raise ValueError(
            f"prefix_tokens ({prefix}) must be within [1, prompt_tokens ({prompt_tokens})] and "
            f"below max_prompt_tokens ({max_prompt_tokens})"
        )
    if num_groups < 1 or not 0 <= grouped_fraction <= 1:
        raise ValueError("num_groups must be >= 1 and grouped_fraction within [0, 1]")
    rng = np.random.default_rng(seed)
    arrivals = _poisson_arrivals(rng, 0.0, duration_s, rate)
    n = arrivals.size
    weights = np.arange(1, num_groups + 1, dtype=float) ** -zipf_s
    drawn = rng.choice(num_groups, n, p=weights / weights.sum())
    groups = np.where(rng.uniform(size=n) < grouped_fraction, drawn, -1).tolist()
    suffixes = _lengths(
        rng, n, max(prompt_tokens - prefix, 1), max_prompt_tokens - prefix, STEADY_SIGMA
    )
    alone = _lengths(rng, n, prompt_tokens, max_prompt_tokens, STEADY_SIGMA)
    outputs = _lengths(rng, n, sizes.output_tokens, sizes.max_output_tokens, STEADY_SIGMA)
    num_tenants = sizes.num_tenants
    tenants = _tenants(rng, n, num_tenants)
    prompts = [prefix + s if g >= 0 else a for g, s, a in zip(groups, suffixes, alone)]
    if num_tenants is not None:
        tenants = [f"t{g % num_tenants}" if g >= 0 else t for g, t in zip(groups, tenants)]
    return [
        TraceRequest(round(t, 6), p, o, f"sys-{g}", prefix, tenant)
        if g >= 0
        else TraceRequest(round(t, 6), p, o, tenant=tenant)
        for t, g, p, o, tenant in zip(arrivals.tolist(), groups, prompts, outputs, tenants)
    ]


FAMILIES: dict[str, Callable[..., list[TraceRequest]]] = {
    "poisson": poisson,
    "diurnal": diurnal,
    "bursty": bursty,
    "heavy_tailed": heavy_tailed,
    "shared_prefix": shared_prefix,
}


def generate(
    family: str, duration_s: float, rate: float, seed: int = 0, **options
) -> list[TraceRequest]:
    """The trace of one family by name; `options` are `TraceSizes` fields (lengths, tenants)
    and the family's own keyword arguments."""
    if family not in FAMILIES:
        raise ValueError(f"unknown trace family {family!r}; choose from {sorted(FAMILIES)}")
    names = {f.name for f in fields(TraceSizes)}
    sizes = TraceSizes(**{k: v for k, v in options.items() if k in names})
    own = {k: v for k, v in options.items() if k not in names}
    return FAMILIES[family](duration_s, rate, seed=seed, sizes=sizes, **own)


# -- the command line ---------------------------------------------------------------------------
def summary(requests: Sequence[TraceRequest]) -> str:
    """One line: how many requests, over how long, at what mean rate, and their mean lengths."""
    if not requests:
        return "0 requests"
    span = requests[-1].arrival_s - requests[0].arrival_s
    rate = f"{len(requests) / span:.2f} req/s" if span > 0 else "all at once"
    prompt = sum(r.prompt_tokens for r in requests) / len(requests)
    output = sum(r.output_tokens for r in requests) / len(requests)
    return (
        f"{len(requests)} requests over {span:.1f} s ({rate}), "
        f"mean {prompt:.0f} prompt / {output:.0f} output tokens"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.traces", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="write a synthetic trace")
    gen.add_argument("family", choices=sorted(FAMILIES))
    gen.add_argument("--duration", type=float, required=True, help="seconds")
    gen.add_argument("--rate", type=float, required=True, help="mean requests per second")
    gen.add_argument("--seed", type=int, default=0)
    for flag, default in (("prompt-tokens", 256), ("output-tokens", 64)):
        gen.add_argument(f"--{flag}", type=int, default=default, help="mean before clipping")
    gen.add_argument("--max-prompt-tokens", type=int, default=1024)
    gen.add_argument("--max-output-tokens", type=int, default=256)
    gen.add_argument("--num-tenants", type=int, help='spread requests over "t0".."tN-1"')
    gen.add_argument("--out", required=True, help="JSONL trace to write")
    imp = commands.add_parser("import", help="convert a public trace file")
    imp.add_argument("format", choices=sorted(IMPORTERS))
    imp.add_argument("path", help="the public trace file")
    imp.add_argument("--limit", type=int, help="keep only the first N requests of the file")
    imp.add_argument("--out", required=True, help="JSONL trace to write")
    return parser


def _requests(args: argparse.Namespace) -> list[TraceRequest]:
    if args.command == "import":
        return IMPORTERS[args.format](args.path, limit=args.limit)
    return generate(
        args.family,
        args.duration,
        args.rate,
        args.seed,
        prompt_tokens=args.prompt_tokens,
        output_tokens=args.output_tokens,
        max_prompt_tokens=args.max_prompt_tokens,
        max_output_tokens=args.max_output_tokens,
        num_tenants=args.num_tenants,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        requests = _requests(args)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    write_trace(args.out, requests)
    print(f"wrote {args.out}: {summary(requests)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
