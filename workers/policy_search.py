"""Trains the learned batching policy in the simulator: a cross-entropy policy search.

The policy's parameters (workers/learned_policy.py) are searched in a normalised box (log scale
where a parameter spans decades). Each round samples a population around the current mean,
replays every training trace in the simulator with each candidate, and moves the mean and
spread to the best few. The cost of a candidate, averaged over the traces, is

    cost = share of requests that missed an SLO (refused ones included)
         + machine_weight x machine-milliseconds per generated token

so a policy gains by meeting more SLOs, and loses by burning machine time to do it. Runs are
deterministic for a seed; a few minutes on a CPU for traces of a minute or two.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from kvstore.trace import TraceRequest
from workers.learned_policy import LearnedParams
from workers.replay import summarize
from workers.simulator import SimSettings, simulate
from workers.step_cost import StepCost

# name -> (low, high, log scale): the box the search moves in.
SEARCH_SPACE: dict[str, tuple[float, float, bool]] = {
    "latency_weight": (0.05, 20.0, True),
    "surge_gain": (0.0, 4.0, False),
    "horizon_s": (0.1, 5.0, True),
    "short_tau_s": (0.1, 2.0, True),
    "length_weight": (0.0, 4.0, False),
    "max_delay_s": (0.0, 4.0, False),
    "admit_slack": (0.3, 3.0, True),
    "surge_admit": (0.0, 2.0, False),
    "step_slo_factor": (0.0, 3.0, False),
    "seq_slo_factor": (0.0, 2.0, False),
    "max_length_error": (0.5, 20.0, True),
}


@dataclass(slots=True)
class SearchRound:
    round: int
    best_cost: float
    mean_cost: float


def _to_unit(params: LearnedParams) -> np.ndarray:
    values = []
    for name, (low, high, log) in SEARCH_SPACE.items():
        v = min(max(getattr(params, name), low), high)
        values.append(
            (math.log(v) - math.log(low)) / (math.log(high) - math.log(low))
            if log
            else (v - low) / (high - low)
        )
    return np.array(values)


def _from_unit(x: np.ndarray, base: LearnedParams) -> LearnedParams:
    values = {}
    for u, (name, (low, high, log)) in zip(np.clip(x, 0.0, 1.0), SEARCH_SPACE.items()):
        values[name] = (
            math.exp(math.log(low) + u * (math.log(high) - math.log(low)))
            if log
            else low + u * (high - low)
        )
    values["long_tau_s"] = max(base.long_tau_s, 2 * values["short_tau_s"])
    return dataclasses.replace(base, **values)


def policy_cost(
    params: LearnedParams,
    traces: list[list[TraceRequest]],
    cost: StepCost,
    settings: SimSettings,
    machine_weight: float = 0.01,
) -> float:
    total = 0.0
    for trace in traces:
        result = simulate(trace, "learned", cost, settings, learned=params)
        summary = summarize(result, settings.slo_ttft_s, settings.slo_itl_s)
        missed = 1.0 - summary["good"] / max(1, summary["requests"])
        total += missed + machine_weight * summary["cpu_s_per_mtok"] * 1e-3  # ms per token
    return total / len(traces)


def train(
    traces: list[list[TraceRequest]],
    cost: StepCost,
    settings: SimSettings | None = None,
    rounds: int = 8,
    population: int = 16,
    elite: int = 4,
    seed: int = 0,
    start: LearnedParams | None = None,
    machine_weight: float = 0.01,
    progress: Callable[[SearchRound], None] | None = None,
) -> tuple[LearnedParams, float]:
    """The best parameters found and their cost."""
    if not traces or not all(traces):
        raise ValueError("training needs at least one non-empty trace")
    if not 1 <= elite <= population:
        raise ValueError("need 1 <= elite <= population")
    settings = settings or SimSettings()
    base = start or LearnedParams()
    rng = np.random.default_rng(seed)
    mean, spread = _to_unit(base), np.full(len(SEARCH_SPACE), 0.25)
    best = base
    best_cost = policy_cost(base, traces, cost, settings, machine_weight)
    for number in range(1, rounds + 1):
        samples = np.clip(mean + spread * rng.standard_normal((population, mean.size)), 0, 1)
        candidates = [_from_unit(x, base) for x in samples]
        costs = [policy_cost(c, traces, cost, settings, machine_weight) for c in candidates]
        order = np.argsort(costs, kind="stable")[:elite]
        if costs[order[0]] < best_cost:
            best, best_cost = candidates[order[0]], costs[order[0]]
        mean = 0.3 * mean + 0.7 * samples[order].mean(axis=0)
        spread = np.maximum(0.3 * spread + 0.7 * samples[order].std(axis=0), 0.02)
        if progress is not None:
            progress(SearchRound(number, best_cost, float(np.mean(costs))))
    return best, best_cost
