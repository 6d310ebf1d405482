"""Admission by predicted time to first token, so overload is shed instead of queued.

A worker keeps count of the requests (and their prompt tokens) it has admitted that have not
produced a first token yet. A new request's first token waits for three things: the time it
already spent on the way (in the router's queue), a free sequence slot when `max_num_seqs`
are taken (the running requests must finish their decodes first), and the prefill of every
prompt ahead of it and its own, in steps of up to `max_num_batched_tokens` tokens beside the
running decodes. Each step costs what the engine's own step-time model says. When that
predicted wait exceeds the TTFT SLO, the request is refused at once with a Retry-After of how
long the backlog needs to drain below it. With an inter-token SLO too, a request is refused
when the decode batch it would join makes every step slower than that SLO. A request that
finds nothing ahead of it is always admitted: it is as fast as the worker gets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from workers.batching_policy import StepTimeModel


@dataclass(slots=True)
class Refusal:
    reason: str
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
        self,
        slo_ttft_s: float | None,
        max_num_batched_tokens: int,
        step_time: StepTimeModel,
        max_num_seqs: int | None = None,
        slo_itl_s: float | None = None,
    ) -> None:
        self.slo_ttft_s = slo_ttft_s
        self.slo_itl_s = slo_itl_s
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.step_time = step_time
        self.queued_tokens = 0  # admitted prompt tokens still waiting for their first token
        self.queued_requests = 0
        self.mean_output_tokens = 0.0  # of admitted requests (their max_tokens), a moving mean
        self.num_refused = 0

    def check(
        self,
        prompt_tokens: int,
        num_running: int,
        waited_s: float = 0.0,
        slack: float = 1.0,
        seq_cap: int | None = None,
    ) -> Refusal | None:
        """None to admit (then `admitted` and, at its first token, `started`), else why not.
        `slack` scales the TTFT SLO and `seq_cap` lowers `max_num_seqs` for this check (the
        batching policy's `admission_slack` and `sequence_cap`)."""
        caps = [c for c in (self.max_num_seqs, seq_cap) if c is not None]
        cap = min(caps) if caps else None
        refusal = self._ttft_refusal(prompt_tokens, num_running, waited_s, slack, cap)
        refusal = refusal or self._itl_refusal(num_running, cap)
        if refusal is not None:
            self.num_refused += 1
        return refusal

    def _ttft_refusal(
        self, prompt_tokens: int, num_running: int, waited_s: float, slack: float, cap: int | None
    ):
        if self.slo_ttft_s is None:
            return None
        slo = self.slo_ttft_s * slack
        slot_wait = self._slot_wait(self.queued_requests + 1, num_running, cap)
        if self.queued_tokens == 0 and slot_wait == 0.0:
            return None
        tokens = self.queued_tokens + prompt_tokens
        prefill = predicted_ttft(tokens, num_running, self.max_num_batched_tokens, self.step_time)
        ttft = waited_s + slot_wait + prefill
        if ttft <= slo:
            return None
        ahead = self._slot_wait(self.queued_requests, num_running, cap) + predicted_ttft(
            self.queued_tokens, num_running, self.max_num_batched_tokens, self.step_time
        )
        return Refusal(
            f"predicted time to first token {ttft:.2f} s exceeds the SLO of {slo:.2f} s",
            max(ahead - slo, 0.0) + 0.1,
        )

    def _itl_refusal(self, num_running: int, cap: int | None):
        """A decode batch so large that every step would exceed the inter-token SLO."""
        if self.slo_itl_s is None:
            return None
        batch = num_running + self.queued_requests + 1
        if cap is not None:
            batch = min(batch, cap)
        if batch <= 1:
            return None
        itl = self.step_time.seconds(batch)
        if itl <= self.slo_itl_s:
            return None
        # Roughly when one running request will have finished and left room.
        wait = self.mean_output_tokens * itl / max(1, num_running)
        return Refusal(
            f"a batch of {batch} would take {itl * 1e3:.1f} ms per token, over the SLO of "
            f"{self.slo_itl_s * 1e3:.1f} ms",
            wait + 0.1,
        )

    def _slot_wait(self, num_new: int, num_running: int, cap: int | None) -> float:
        """Seconds until `num_new` more requests all hold a sequence slot: each "round" of
        `cap` (max_num_seqs, or the policy's lower cap) that must finish first takes a mean
        decode at a full batch."""
        if cap is None:
            return 0.0
        over = num_running + num_new - cap
        if over <= 0:
            return 0.0
        rounds = math.ceil(over / cap)
        return rounds * self.mean_output_tokens * self.step_time.seconds(cap)

    def admitted(self, prompt_tokens: int, max_tokens: int = 0) -> None:
        self.queued_tokens += prompt_tokens
        self.queued_requests += 1
        if self.mean_output_tokens == 0.0:  # the first request sets it, not a ramp from zero
            self.mean_output_tokens = float(max_tokens)
        self.mean_output_tokens += 0.1 * (max_tokens - self.mean_output_tokens)

    def started(self, prompt_tokens: int) -> None:
        self.queued_tokens = max(0, self.queued_tokens - prompt_tokens)
        self.queued_requests = max(0, self.queued_requests - 1)
