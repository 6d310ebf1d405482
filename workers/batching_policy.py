"""Dynamic batching: how many tokens and sequences the next step may take.

The scheduler asks a policy for each step's limits from a snapshot of the live queue, and the
engine reports back how long each step took. `FixedBatchingPolicy` returns constants (the usual
engine settings, kept for comparison); `AdaptiveBatchingPolicy` reads the engine's fitted step
time (`StepTimeModel`, one per engine, shared with speculative decoding) and sizes prefill
chunks to trade the running requests' inter-token latency against the waiting requests' time
to first token. A learned policy implements the same two methods.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

from workers.request import Request
from workers.step_cost import StepFeatures


@dataclass(slots=True)
class QueueSnapshot:
    num_running: int  # requests holding KV (decoding or mid-prefill)
    num_waiting: int
    num_waiting_tokens: int  # tokens the waiting requests still have to prefill
    num_free_blocks: int
    num_running_tokens: int = 0  # tokens the running requests hold (their attention's reach)
    now: float = 0.0  # the scheduler's clock, seconds
    # Requests (and their prompt tokens) that ever arrived: a forecaster reads rates off them.
    num_arrivals: int = 0
    num_arrived_tokens: int = 0


@dataclass(slots=True)
class BatchLimits:
    max_num_batched_tokens: int
    max_num_seqs: int


class BatchingPolicy(ABC):
    @abstractmethod
    def limits(self, queue: QueueSnapshot) -> BatchLimits:
        """Limits for the next step."""

    def observe(self, step: StepFeatures, seconds: float) -> None:  # noqa: B027
        """Feedback: a step that computed `step` took `seconds`. Policies that learn nothing
        from it keep this default."""

    def finished(self, request: Request) -> None:  # noqa: B027
        """Feedback: a request ended (its output length is known now)."""

    def waiting_key(self, request: Request) -> tuple:
        """The waiting queue's order (smallest first), fixed when a request joins it; it must
        end in the request's unique `arrival_order`. Default: priority, then first come."""
        return request.sort_key()

    def set_targets(self, slo_ttft_s: float | None, slo_itl_s: float | None) -> None:  # noqa: B027
        """The SLOs the worker serves to; policies that do not plan by them ignore this."""

    def admission_slack(self) -> float:
        """Admission (workers/admission.py) admits while the predicted time to first token is
        within this many times the SLO."""
        return 1.0

    def sequence_cap(self) -> int | None:
        """A sequence cap below max_num_seqs that admission must plan by, if the policy sets
        one."""
        return None

    def describe(self) -> dict[str, float]:
        """What the policy currently believes, for stats."""
        return {}


class FixedBatchingPolicy(BatchingPolicy):
    def __init__(self, max_num_batched_tokens: int, max_num_seqs: int) -> None:
        self._limits = BatchLimits(max_num_batched_tokens, max_num_seqs)

    def limits(self, queue: QueueSnapshot) -> BatchLimits:
        return self._limits


class StepTimeModel:
    """Exponentially weighted least-squares fit of step seconds = overhead + per_token * tokens."""

    def __init__(self, decay: float = 0.95, overhead: float = 0.005, per_token: float = 1e-4):
        self.decay = decay
        self.overhead, self.per_token = overhead, per_token
        self._w = self._x = self._y = self._xx = self._xy = 0.0

    def observe(self, tokens: int, seconds: float) -> None:
        d = self.decay
        self._w = d * self._w + 1
        self._x = d * self._x + tokens
        self._y = d * self._y + seconds
        self._xx = d * self._xx + tokens * tokens
        self._xy = d * self._xy + tokens * seconds
        var = self._xx / self._w - (self._x / self._w) ** 2
        if var > 1.0:  # enough spread in batch sizes to separate overhead from per-token cost
            slope = (self._xy / self._w - self._x * self._y / self._w**2) / var
            if slope > 0:
                self.per_token = slope
                self.overhead = max(0.0, self._y / self._w - slope * self._x / self._w)

    def seconds(self, tokens: int) -> float:
        return self.overhead + self.per_token * tokens


def optimal_prefill_chunk(
    waiting: float,
    waiting_tokens: float,
    decoding: int,
    overhead: float,
    per_token: float,
    latency_weight: float,
) -> float:
    """c* = sqrt(W P (a + b D) / (w D b)): the prefill chunk that minimises the latency cost of
    `AdaptiveBatchingPolicy` (D > 0 decoding). A latency weight of 0 (only the queue counts)
    gives an unbounded chunk: the step takes the whole budget."""
    backlog = waiting * waiting_tokens * (overhead + per_token * decoding)
    return math.sqrt(backlog / (max(latency_weight, 1e-9) * decoding * max(per_token, 1e-12)))


class AdaptiveBatchingPolicy(BatchingPolicy):
    """Sizes each step's prefill chunk by minimising a latency cost on a fitted step time.

    A step of n tokens takes t(n) = a + b n (fitted online). With D requests decoding, W
    waiting with P prompt tokens between them, and a prefill chunk of c tokens, a step costs
        J(c) = latency_weight * D * t(D + c)        (each running request waits a step)
             + W * (P / c) * t(D + c)               (waiting requests wait for the backlog)
    whose minimum is at c* = sqrt(W P (a + b D) / (latency_weight D b)). Few decodes or a large
    backlog give large chunks (throughput, time to first token); many decodes and a small
    backlog give small ones (inter-token latency). With nothing decoding, or nothing
    waiting, the step simply takes the whole budget.
    """

    def __init__(
        self,
        max_num_batched_tokens: int,
        max_num_seqs: int,
        step_time: StepTimeModel,
        latency_weight: float = 1.0,
        min_prefill_chunk: int = 32,
    ) -> None:
        self.max_tokens = max_num_batched_tokens
        self.max_seqs = max_num_seqs
        self.latency_weight = latency_weight
        self.min_chunk = min_prefill_chunk
        self.model = step_time  # fitted by the engine from every step it runs
        self.last_budget = max_num_batched_tokens

    def limits(self, queue: QueueSnapshot) -> BatchLimits:
        budget = self.max_tokens
        decoding, waiting = queue.num_running, queue.num_waiting
        if decoding and waiting:
            model = self.model
            chunk = optimal_prefill_chunk(
                waiting, queue.num_waiting_tokens, decoding, model.overhead, model.per_token,
                self.latency_weight,
            )  # fmt: skip
            budget = min(self.max_tokens, decoding + max(self.min_chunk, int(chunk)))
        self.last_budget = budget
        return BatchLimits(budget, self.max_seqs)

    def describe(self) -> dict[str, float]:
        return {
            "token_budget": self.last_budget,
            "step_overhead_s": self.model.overhead,
            "step_seconds_per_token": self.model.per_token,
        }
