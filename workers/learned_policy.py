"""The learned batching policy: the adaptive policy's cost model steered by a forecast of arrivals,
a shortest-predicted-first queue that cannot starve, and admission tuned to the traffic.

Its parameters (`LearnedParams`, a small JSON file) are trained in the simulator
(`workers/policy_search.py`, `manta train-scheduler`) against a cost of SLO violations plus
machine-seconds per token; the file shipped beside this module is the default. What it does
each step, in the order the scheduler asks:

- **Forecast.** Arrival and prompt-token rates are kept at two time scales (exponential-kernel
  intensities, short and long). Their excess, short over long, is a surge building up: the
  tokens it will bring within `horizon_s` are counted as backlog before they arrive, so the
  prefill budget rises ahead of the queue.
- **Budget.** The adaptive policy's optimum chunk, c* = sqrt(W P (a + b D) / (w D b)), over the
  waiting plus forecast requests and tokens, then no larger than keeps a step beside the
  running decodes within `step_slo_factor` x the inter-token SLO.
- **Sequence cap.** No more sequences than decode within `seq_slo_factor` x that SLO; admission
  plans by the cap (`sequence_cap()`).
- **Order.** A waiting request's key is its arrival time plus a delay for its predicted work
  (prompt prefill and an output length predicted online from prompt length and the lengths
  seen), capped at `max_delay_s`: short requests go first, and no request is ever passed by
  one that arrived more than `max_delay_s` after it, so none starves.
- **Admission.** The worker's TTFT admission scaled by `admission_slack()`: the trained slack,
  tightened while a surge builds.

If its predictions go bad (step times or output lengths off by more than the set tolerance, as a
moving mean), it falls back to the adaptive policy, first-come order and plain admission until
they recover.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from workers.batching_policy import (
    AdaptiveBatchingPolicy,
    BatchingPolicy,
    BatchLimits,
    QueueSnapshot,
    StepTimeModel,
    optimal_prefill_chunk,
)
from workers.request import Request
from workers.step_cost import OnlineStepCost, StepCostModel, StepFeatures

DEFAULT_PARAMS_PATH = Path(__file__).with_name("learned_policy.json")


@dataclass(frozen=True, slots=True)
class LearnedParams:
    latency_weight: float = 1.0  # running requests' latency against the queue's, as adaptive's
    surge_gain: float = 1.0  # how much of a building surge's tokens count as backlog now
    horizon_s: float = 1.0  # how far ahead the forecast looks
    short_tau_s: float = 0.5  # time scales of the two arrival-rate estimates
    long_tau_s: float = 10.0
    length_weight: float = 0.5  # queue delay per second of predicted work
    max_delay_s: float = 1.0  # the most a request can be passed over: no starvation
    admit_slack: float = 1.0  # admit while predicted TTFT <= slack x SLO
    surge_admit: float = 0.0  # how much a building surge tightens admission
    # While requests decode, no step longer than this many times the inter-token SLO, and no
    # more sequences than decode within seq_slo_factor times it (0: off).
    step_slo_factor: float = 0.0
    seq_slo_factor: float = 0.0
    max_step_error: float = 0.5  # fall back when step times are off by more than this
    max_length_error: float = 2.0  # ... or output lengths (relative error, moving means)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"learned policy parameter {f.name} must be >= 0, got {value!r}")
        if self.short_tau_s <= 0 or self.long_tau_s <= self.short_tau_s:
            raise ValueError("need 0 < short_tau_s < long_tau_s")
        if self.admit_slack <= 0:
            raise ValueError("admit_slack must be > 0")

    def save(self, path: str | Path, **about: object) -> None:
        Path(path).write_text(json.dumps({"params": asdict(self), **about}, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path = DEFAULT_PARAMS_PATH) -> LearnedParams:
        record = json.loads(Path(path).read_text())
        params = record.get("params") if isinstance(record, dict) else None
        if not isinstance(params, dict):
            raise ValueError(f"{path}: expected {{'params': {{...}}}}")
        unknown = set(params) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"{path}: unknown learned policy parameters {sorted(unknown)}")
        return cls(**params)


class RateForecaster:
    """Arrival and prompt-token intensities at a short and a long time scale: each arrival adds
    1/tau to an estimate that decays as exp(-dt/tau)."""

    def __init__(self, short_tau_s: float, long_tau_s: float) -> None:
        self.taus = (short_tau_s, long_tau_s)
        self.rates = [0.0, 0.0]  # requests/s
        self.token_rates = [0.0, 0.0]  # prompt tokens/s
        self._now: float | None = None
        self._arrivals = self._tokens = 0

    def update(self, now: float, num_arrivals: int, num_tokens: int) -> None:
        new, new_tokens = num_arrivals - self._arrivals, num_tokens - self._tokens
        self._arrivals, self._tokens = num_arrivals, num_tokens
        dt = 0.0 if self._now is None else max(0.0, now - self._now)
        self._now = now
        for i, tau in enumerate(self.taus):
            decay = math.exp(-dt / tau)
            self.rates[i] = self.rates[i] * decay + new / tau
            self.token_rates[i] = self.token_rates[i] * decay + new_tokens / tau

    @property
    def surge(self) -> float:
        """Short-term over long-term arrival rate: > 1 while a surge builds."""
        return self.rates[0] / self.rates[1] if self.rates[1] > 0 else 1.0

    def excess(self, horizon_s: float) -> tuple[float, float]:
        """Requests and prompt tokens a building surge brings above the steady rate within
        `horizon_s`."""
        return (
            max(0.0, self.rates[0] - self.rates[1]) * horizon_s,
            max(0.0, self.token_rates[0] - self.token_rates[1]) * horizon_s,
        )


class OutputLengthPredictor:
    """Output tokens from the prompt's length (log2 buckets, a moving mean each) and the
    lengths seen overall; never more than the request's max_tokens."""

    def __init__(self, weight: float = 0.1) -> None:
        self.weight = weight
        self.mean = 0.0
        self.by_bucket: dict[int, float] = {}
        self.relative_error = 0.0  # moving mean of |predicted - actual| / actual

    @staticmethod
    def _bucket(prompt_tokens: int) -> int:
        return max(0, prompt_tokens).bit_length()

    def predict(self, prompt_tokens: int, max_tokens: int) -> float:
        guess = self.by_bucket.get(self._bucket(prompt_tokens), self.mean) or max_tokens
        return min(float(max_tokens), guess)

    def observe(self, prompt_tokens: int, max_tokens: int, output_tokens: int) -> None:
        if output_tokens < 1:
            return
        error = abs(self.predict(prompt_tokens, max_tokens) - output_tokens) / output_tokens
        w = self.weight
        self.relative_error += w * (error - self.relative_error)
        self.mean = (
            output_tokens if self.mean == 0.0 else self.mean + w * (output_tokens - self.mean)
        )
        bucket = self._bucket(prompt_tokens)
        old = self.by_bucket.get(bucket)
        self.by_bucket[bucket] = output_tokens if old is None else old + w * (output_tokens - old)


class LearnedBatchingPolicy(BatchingPolicy):
    def __init__(
        self,
        max_num_batched_tokens: int,
        max_num_seqs: int,
        step_time: StepTimeModel,
        params: LearnedParams | None = None,
    ) -> None:
        self.params = params or LearnedParams.load()
        self.max_tokens, self.max_seqs = max_num_batched_tokens, max_num_seqs
        self.fallback = AdaptiveBatchingPolicy(
            max_num_batched_tokens, max_num_seqs, step_time, self.params.latency_weight
        )
        # Its own fit of what a step costs, from every step's features (workers/step_cost.py).
        prior = StepCostModel(step_time.overhead, step_time.per_token, step_time.per_token)
        self.cost = OnlineStepCost(prior)
        self.forecast = RateForecaster(self.params.short_tau_s, self.params.long_tau_s)
        self.lengths = OutputLengthPredictor()
        self.step_error = 0.0  # moving mean of the step-cost model's relative error
        self.falling_back = False
        self.last_budget, self.last_seqs = max_num_batched_tokens, max_num_seqs
        self.slo_itl_s: float | None = None

    def set_targets(self, slo_ttft_s: float | None, slo_itl_s: float | None) -> None:
        self.slo_itl_s = slo_itl_s

    def limits(self, queue: QueueSnapshot) -> BatchLimits:
        self.forecast.update(queue.now, queue.num_arrivals, queue.num_arrived_tokens)
        if self.falling_back:
            limits = self.fallback.limits(queue)
        else:
            limits = BatchLimits(self._budget(queue), self._seq_cap(queue))
        self.last_budget, self.last_seqs = limits.max_num_batched_tokens, limits.max_num_seqs
        return limits

    def _budget(self, queue: QueueSnapshot) -> int:
        """The adaptive optimum over the waiting and the forecast work, then no larger than
        keeps a step beside the running decodes within step_slo_factor x the ITL SLO."""
        p, m = self.params, self.cost.model
        decoding = queue.num_running
        extra_requests, extra_tokens = self.forecast.excess(p.horizon_s)
        waiting = queue.num_waiting + p.surge_gain * extra_requests
        waiting_tokens = queue.num_waiting_tokens + p.surge_gain * extra_tokens
        budget = self.max_tokens
        if not decoding:
            return budget
        per_token = max(m.b_prefill, 1e-9)
        if waiting >= 1:
            chunk = optimal_prefill_chunk(
                waiting, waiting_tokens, decoding, m.a, per_token, p.latency_weight
            )
            budget = min(budget, decoding + max(32, int(chunk)))
        if self.slo_itl_s and p.step_slo_factor:
            decode_only = StepFeatures(0, decoding, queue.num_running_tokens, decoding)
            room = p.step_slo_factor * self.slo_itl_s - m.seconds(decode_only)
            # b c + d c^2 / 2 <= room: a new prompt's chunk of c tokens, attention included
            b, d, chunk = per_token, m.d_context, 0.0
            if room > 0:
                chunk = room / b if d == 0 else (math.sqrt(b * b + 2 * d * room) - b) / d
            budget = min(budget, decoding + max(16, int(chunk)))
        return budget

    def _seq_cap(self, queue: QueueSnapshot) -> int:
        """The most sequences whose decode step stays within seq_slo_factor x the ITL SLO."""
        p, m = self.params, self.cost.model
        if not (self.slo_itl_s and p.seq_slo_factor):
            return self.max_seqs
        context = queue.num_running_tokens / queue.num_running if queue.num_running else 0.0
        per_seq = m.c_decode + m.e_seqs + m.d_context * context
        if per_seq <= 0:
            return self.max_seqs
        seqs = (p.seq_slo_factor * self.slo_itl_s - m.a) / per_seq
        return max(1, min(self.max_seqs, int(seqs)))

    def waiting_key(self, request: Request) -> tuple:
        if self.falling_back:
            return request.sort_key()
        p, m = self.params, self.cost.model
        output = self.lengths.predict(request.num_prompt_tokens, request.params.max_tokens)
        remaining = request.num_tokens - request.num_computed_tokens
        work_s = m.b_prefill * remaining + (m.a + m.c_decode + m.e_seqs) * output
        delay = min(p.max_delay_s, p.length_weight * work_s)
        return (request.priority, request.arrival_time + delay, request.arrival_order)

    def observe(self, step: StepFeatures, seconds: float) -> None:
        if seconds > 0:
            error = abs(self.cost.model.seconds(step) - seconds) / seconds
            self.step_error += 0.05 * (error - self.step_error)
        self.cost.observe(step, seconds)
        self._check_predictions()

    def finished(self, request: Request) -> None:
        generated = request.num_output_tokens + request.params.resumed_output_tokens
        self.lengths.observe(request.num_prompt_tokens, request.params.max_tokens, generated)

    def _check_predictions(self) -> None:
        """Fall back while either prediction is off; recover at half the tolerance."""
        p = self.params
        bad = self.step_error > p.max_step_error or self.lengths.relative_error > p.max_length_error
        good = (
            self.step_error < p.max_step_error / 2
            and self.lengths.relative_error < p.max_length_error / 2
        )
        if bad:
            self.falling_back = True
        elif good:
            self.falling_back = False

    def admission_slack(self) -> float:
        if self.falling_back:
            return 1.0
        p = self.params
        return p.admit_slack / (1.0 + p.surge_admit * max(0.0, self.forecast.surge - 1.0))

    def sequence_cap(self) -> int | None:
        return None if self.falling_back else self.last_seqs

    def describe(self) -> dict[str, float]:
        m = self.cost.model
        return {
            "token_budget": self.last_budget,
            "sequence_cap": self.last_seqs,
            "step_overhead_s": m.a,
            "step_seconds_per_token": m.b_prefill,
            "surge": self.forecast.surge,
            "step_error": self.step_error,
            "output_length_error": self.lengths.relative_error,
            "fallback": float(self.falling_back),
        }
