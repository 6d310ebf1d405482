"""What one engine step costs, from what it computes: the simulator's stand-in for a forward pass.

    t = a + b * prefill tokens + c * decode tokens + d * attention pairs + e * sequences

`a` is the step's fixed overhead (scheduling, launch, sampling), `b` and `c` the per-token cost
of the dense layers (prefill and decode tokens batch differently on a GPU), `d` attention (per
query-key pair: a token attends to every position before it, so a long prompt's prefill grows
quadratically), `e` per-sequence bookkeeping. `manta bench calibrate` fits the five
from steps the engine measures on a machine and writes them as JSON for the simulator.

The simulator adds to that line what it leaves unexplained, per step kind (decode only, or
with prefill) and batch-size bucket (`BucketedStepCost`): kernels change path with the batch
size (on this CPU a decode of 1-2 sequences costs half of one of 3, and a step with prefill
pays a fixed extra for its attention path; CUDA graphs pad a batch up to a captured size),
which no linear term follows. The batching policies keep the plain line, fitted online.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the scheduler's policies read StepFeatures: no import cycle
    from workers.scheduler import SchedulerOutput

COEFFICIENTS = ("a", "b_prefill", "c_decode", "d_context", "e_seqs")
# The small preset's steps on a 2-core AVX2 CPU: what the simulator assumes unless told.
DEFAULT_STEP_COST_PATH = Path(__file__).with_name("step_cost.json")


@dataclass(frozen=True, slots=True)
class StepFeatures:
    prefill_tokens: int
    decode_tokens: int  # tokens of requests past their prompt (one each, plus drafts)
    context_tokens: int  # (query, KV position) pairs attention computes: its quadratic part
    num_seqs: int

    @property
    def num_tokens(self) -> int:
        return self.prefill_tokens + self.decode_tokens

    def row(self) -> list[float]:
        return [1.0, self.prefill_tokens, self.decode_tokens, self.context_tokens, self.num_seqs]


def step_features(out: SchedulerOutput) -> StepFeatures:
    """The features of a scheduled step (read before its tokens are applied)."""
    prefill = decode = context = 0
    for request, n in zip(out.requests, out.num_scheduled_tokens):
        start = request.num_computed_tokens
        if start >= request.num_prompt_tokens:
            decode += n
        else:
            prefill += n
        context += n * start + n * (n + 1) // 2  # each new token attends to all before it
    return StepFeatures(prefill, decode, context, len(out.requests))


@dataclass(frozen=True, slots=True)
class StepCostModel:
    a: float = 5e-3
    b_prefill: float = 1e-4
    c_decode: float = 1e-4
    d_context: float = 0.0
    e_seqs: float = 0.0

    def seconds(self, f: StepFeatures) -> float:
        return (
            self.a
            + self.b_prefill * f.prefill_tokens
            + self.c_decode * f.decode_tokens
            + self.d_context * f.context_tokens
            + self.e_seqs * f.num_seqs
        )

    @classmethod
    def fit(
        cls, features: list[StepFeatures], seconds: list[float], relative: bool = True
    ) -> StepCostModel:
        """Least squares, every coefficient kept >= 0 (a negative cost is never physical, so
        a column whose coefficient comes out negative is dropped and the rest refitted).
        `relative`: on the relative error, each step weighted by 1/its time, so short decode
        steps count as much as long prefills (what a policy predicting each step needs);
        else on the error in seconds, so the sum over a run comes out right (what a
        simulation of latencies needs)."""
        if len(features) < len(COEFFICIENTS):
            raise ValueError(f"fitting needs at least {len(COEFFICIENTS)} steps")
        x = np.array([f.row() for f in features])
        y = np.asarray(seconds, dtype=float)
        if (y <= 0).any():
            raise ValueError("step times must be > 0")
        if relative:
            x, y = x / y[:, None], np.ones_like(y)
        return cls.from_normal_equations(x.T @ x, x.T @ y)

    @classmethod
    def from_normal_equations(cls, xtx: np.ndarray, xty: np.ndarray) -> StepCostModel:
        """The non-negative solution of xtx @ coef = xty (columns as in `StepFeatures.row`)."""
        active = list(range(len(COEFFICIENTS)))
        while True:
            sub = np.ix_(active, active)
            coef = np.linalg.lstsq(xtx[sub], xty[active], rcond=None)[0]
            if (coef >= 0).all() or len(active) == 1:
                break
            active.pop(int(np.argmin(coef)))
        values = dict.fromkeys(COEFFICIENTS, 0.0)
        for index, value in zip(active, coef):
            values[COEFFICIENTS[index]] = max(0.0, float(value))
        return cls(**values)

    def relative_error(self, features: list[StepFeatures], seconds: list[float]) -> float:
        """Mean |predicted - measured| / measured over these steps."""
        errors = [abs(self.seconds(f) - s) / s for f, s in zip(features, seconds) if s > 0]
        return float(np.mean(errors)) if errors else 0.0

    def save(self, path: str | Path, **about: object) -> None:
        Path(path).write_text(json.dumps({"step_cost": asdict(self), **about}, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> StepCostModel:
        record = json.loads(Path(path).read_text())
        values = record.get("step_cost") if isinstance(record, dict) else None
        if not isinstance(values, dict) or set(values) != set(COEFFICIENTS):
            raise ValueError(f"{path}: expected {{'step_cost': {{{', '.join(COEFFICIENTS)}}}}}")
        if not all(isinstance(v, int | float) and v >= 0 for v in values.values()):
            raise ValueError(f"{path}: step-cost coefficients must be numbers >= 0")
        return cls(**{k: float(v) for k, v in values.items()})


# Batch-size buckets 1, 2, 3-4, 5-8, 9-16, 17-32, 33+.
NUM_BUCKETS = 7


def seq_bucket(num_seqs: int) -> int:
    return min(max(num_seqs - 1, 0).bit_length(), NUM_BUCKETS - 1)


@dataclass(frozen=True, slots=True)
class BucketedStepCost:
    """The simulator's step cost: the linear model plus the mean residual it leaves on steps of
    the same kind (decode only, or with prefill) and batch-size bucket."""

    linear: StepCostModel
    decode_residuals: tuple[float, ...] = (0.0,) * NUM_BUCKETS
    prefill_residuals: tuple[float, ...] = (0.0,) * NUM_BUCKETS

    def __post_init__(self) -> None:
        for table in (self.decode_residuals, self.prefill_residuals):
            if len(table) != NUM_BUCKETS or not all(np.isfinite(table)):
                raise ValueError(f"residual tables need {NUM_BUCKETS} finite numbers each")

    def seconds(self, f: StepFeatures) -> float:
        table = self.prefill_residuals if f.prefill_tokens else self.decode_residuals
        return max(1e-6, self.linear.seconds(f) + table[seq_bucket(f.num_seqs)])

    @classmethod
    def fit(
        cls, features: list[StepFeatures], seconds: list[float], min_steps: int = 8
    ) -> BucketedStepCost:
        """The line on the error in seconds, then each cell's mean residual (0 for a cell
        with fewer than `min_steps` steps: too few to tell from noise)."""
        linear = StepCostModel.fit(features, seconds, relative=False)
        cells: dict[tuple[bool, int], list[float]] = {}
        for f, s in zip(features, seconds):
            key = (f.prefill_tokens > 0, seq_bucket(f.num_seqs))
            cells.setdefault(key, []).append(s - linear.seconds(f))

        def table(prefill: bool) -> tuple[float, ...]:
            return tuple(
                float(np.mean(r)) if len(r := cells.get((prefill, b), [])) >= min_steps else 0.0
                for b in range(NUM_BUCKETS)
            )

        return cls(linear, table(False), table(True))

    def relative_error(self, features: list[StepFeatures], seconds: list[float]) -> float:
        errors = [abs(self.seconds(f) - s) / s for f, s in zip(features, seconds) if s > 0]
        return float(np.mean(errors)) if errors else 0.0

    def save(self, path: str | Path, **about: object) -> None:
        residuals = {"decode": list(self.decode_residuals), "prefill": list(self.prefill_residuals)}
        self.linear.save(path, residuals=residuals, **about)

    @classmethod
    def load(cls, path: str | Path) -> BucketedStepCost:
        """A calibration file; one written before the residual tables counts them as 0."""
        linear = StepCostModel.load(path)
        residuals = json.loads(Path(path).read_text()).get("residuals")
        if residuals is None:
            return cls(linear)
        try:
            return cls(linear, tuple(residuals["decode"]), tuple(residuals["prefill"]))
        except (TypeError, KeyError, ValueError) as e:
            raise ValueError(f"{path}: bad residual tables: {e}") from None


class OnlineStepCost:
    """The same fit, kept up to date from every step a policy sees: exponentially forgotten
    normal equations (of the relative error), solved again every `refit_every` steps."""

    def __init__(self, prior: StepCostModel, decay: float = 0.995, refit_every: int = 32) -> None:
        self.model = prior
        self.decay, self.refit_every = decay, refit_every
        self._xtx = np.zeros((len(COEFFICIENTS), len(COEFFICIENTS)))
        self._xty = np.zeros(len(COEFFICIENTS))
        self._count = 0

    def observe(self, features: StepFeatures, seconds: float) -> None:
        if seconds <= 0:
            return
        x = np.array(features.row()) / seconds
        self._xtx = self.decay * self._xtx + np.outer(x, x)
        self._xty = self.decay * self._xty + x
        self._count += 1
        if self._count >= len(COEFFICIENTS) * 4 and self._count % self.refit_every == 0:
            self.model = StepCostModel.from_normal_equations(self._xtx, self._xty)


@dataclass(frozen=True, slots=True)
class ScaledStepCost:
    """A step cost run faster or slower, decode-only steps by `decode` and steps with prefill
    by `prefill`: a calibration carried to the machine's speed of the moment (a shared
    machine's drifts by tens of percent within an hour; decode steps, bound by per-step
    overheads, drift unlike prefill steps, bound by matrix products)."""

    base: StepCost
    decode: float = 1.0
    prefill: float = 1.0

    def seconds(self, f: StepFeatures) -> float:
        return self.base.seconds(f) * (self.prefill if f.prefill_tokens else self.decode)


StepCost = StepCostModel | BucketedStepCost | ScaledStepCost  # what a simulated step is priced by


def speed_factors(cost: StepCost, steps: list[tuple[StepFeatures, float]]) -> tuple[float, float]:
    """(decode, prefill): measured over predicted seconds, summed over the steps of each
    kind; 1.0 for a kind with no steps."""
    sums = {False: [0.0, 0.0], True: [0.0, 0.0]}
    for f, seconds in steps:
        cell = sums[f.prefill_tokens > 0]
        cell[0] += seconds
        cell[1] += cost.seconds(f)
    decode, prefill = ((m / p if p > 0 else 1.0) for m, p in (sums[False], sums[True]))
    return decode, prefill
