"""Admission by predicted time to first token, so overload is shed instead of queued.

A worker keeps count of the prompt tokens it has admitted that have not produced a first token
yet. A new request's first token waits for all of them and its own prompt: prefill steps of
up to `max_num_batched_tokens` tokens (less the running decodes each step also carries), each
costing what the engine's own step-time model says. When that predicted wait exceeds the TTFT
SLO, the request is refused at once with a Retry-After of how long the backlog needs to drain
below it. A request that finds nothing ahead of it is always admitted: it is as fast as the
worker gets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from workers.batching_policy import StepTimeModel


@dataclass(slots=True)
class Refusal:
    predicted_ttft_s: float
    retry_after_s: float


def predicted_ttft(
    tokens: int, num_running: int, max_num_batched_tokens: int, step_time: StepTimeModel
) -> float:
    """Seconds until a request is through prefill with `tokens` prompt tokens ahead of and
    including its own, while `num_running` requests decode beside them."""
    room = max(1, max_num_batched_tokens - num_running)
    steps = math.ceil(tokens / room)
    per_step = min(tokens, room) + num_running
    return steps * step_time.seconds(per_step)


class AdmissionControl:
    def __init__(
        self, slo_ttft_s: float | None, max_num_batched_tokens: int, step_time: StepTimeModel
    ) -> None:
        self.slo_ttft_s = slo_ttft_s
        self.max_num_batched_tokens = max_num_batched_tokens
        self.step_time = step_time
        self.queued_tokens = 0  # admitted prompt tokens still waiting for their first token
        self.num_refused = 0

    def check(self, prompt_tokens: int, num_running: int) -> Refusal | None:
        """None to admit (then `admitted` and, at its first token, `started`), else why not."""
        if self.slo_ttft_s is None or self.queued_tokens == 0:
            return None
        tokens = self.queued_tokens + prompt_tokens
        ttft = predicted_ttft(tokens, num_running, self.max_num_batched_tokens, self.step_time)
        if ttft <= self.slo_ttft_s:
            return None
        self.num_refused += 1
        ahead = predicted_ttft(
            self.queued_tokens, num_running, self.max_num_batched_tokens, self.step_time
        )
        return Refusal(ttft, max(ahead - self.slo_ttft_s, 0.0) + 0.1)

    def admitted(self, prompt_tokens: int) -> None:
        self.queued_tokens += prompt_tokens

    def started(self, prompt_tokens: int) -> None:
        self.queued_tokens = max(0, self.queued_tokens - prompt_tokens)
