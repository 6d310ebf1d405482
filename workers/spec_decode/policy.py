"""How many tokens to speculate: fixed, or chosen each step from measured acceptance and cost.

With acceptance rate a, a request speculating k tokens emits E(k) = (1 - a^(k+1)) / (1 - a)
tokens per verification step. A step over D decoding requests costs t(D) = c0 + c1 D without
speculation and c0 + c1 D (k + 1) + k x draft_step with it (the fitted step-time model plus
the measured draft cost). The policy picks the k that maximises tokens per second, and 0 unless
that beats plain decoding by a margin: on a large batch, verifying drafts costs more compute
than it saves.
"""

from __future__ import annotations

from collections.abc import Sequence


def expected_tokens(acceptance: float, k: int) -> float:
    if acceptance >= 1.0:
        return k + 1.0
    return (1 - acceptance ** (k + 1)) / (1 - acceptance)


class SpeculationPolicy:
    def __init__(
        self,
        fixed_k: int | None,
        max_k: int = 8,
        prior_acceptance: float = 0.5,
        explore_every: int = 32,
        min_gain: float = 1.1,
    ):
        self.fixed_k = fixed_k
        self.max_k = max_k if fixed_k is None else fixed_k
        self.prior = prior_acceptance
        # Speculate only for a predicted gain of at least this factor: the cost model is
        # approximate, and a marginal win predicted is often a small loss measured.
        self.min_gain = min_gain
        # After this many steps at k = 0, speculate once (k = 1) so the acceptance and cost
        # estimates stay fresh instead of freezing at a value that once said "no".
        self.explore_every = explore_every
        self._idle_steps = 0
        self._acceptance: dict[str, float] = {}
        # What drafts have been worth across all requests: a new request starts from it.
        self._global = prior_acceptance
        # Measured / predicted time of speculative steps: corrects what the linear cost model
        # misses (the draft catching up on new prompts, wider logits, verification).
        self.cost_factor = 1.0
        self._predicted_s = 0.0
        self.counters = {
            "spec_decode_steps": 0,
            "spec_decode_proposed_tokens": 0,
            "spec_decode_accepted_tokens": 0,
            "spec_decode_k_chosen": 0,
        }

    def acceptance(self, request_id: str) -> float:
        return self._acceptance.get(request_id, self._global)

    def choose(
        self,
        request_ids: Sequence[str],
        overhead_s: float,
        per_token_s: float,
        draft_step_s: float,
        catch_up_s: float = 0.0,
    ) -> int:
        """One k for this step's decoding requests; `catch_up_s` is the draft prefill that
        speculating now would cost first (fresh prompts the draft has not seen)."""
        if not request_ids:
            return 0
        if self.fixed_k is not None:
            return self.fixed_k
        d = len(request_ids)
        costs = (overhead_s, per_token_s, draft_step_s, catch_up_s)
        best_k = self._best_k([self.acceptance(r) for r in request_ids], *costs)
        self._idle_steps = self._idle_steps + 1 if best_k == 0 else 0
        # Explore only where even a very good draft would pay: elsewhere it is pure cost.
        if self._idle_steps >= self.explore_every and self._best_k([0.9] * d, *costs):
            self._idle_steps = 0
            return 1
        return best_k

    def _best_k(
        self, rates, overhead_s: float, per_token_s: float, draft_step_s: float, catch_up_s: float
    ) -> int:
        d = len(rates)
        plain = d / (overhead_s + per_token_s * d)
        best_k, best = 0, plain * self.min_gain
        for k in range(1, self.max_k + 1):
            tokens = sum(expected_tokens(a, k) for a in rates)
            seconds = overhead_s + per_token_s * d * (k + 1) + k * draft_step_s + catch_up_s
            if tokens / (seconds * self.cost_factor) > best:
                best_k, best = k, tokens / (seconds * self.cost_factor)
        if best_k:
            k = best_k
            self._predicted_s = (
                overhead_s + per_token_s * d * (k + 1) + k * draft_step_s + catch_up_s
            )
        return best_k

    def observe_step_time(self, seconds: float) -> None:
        """The whole last speculative step (proposing included) took `seconds`."""
        if self._predicted_s > 0:
            ratio = min(seconds / self._predicted_s, 10.0)
            self.cost_factor = 0.8 * self.cost_factor + 0.2 * max(ratio, 1.0)
            self._predicted_s = 0.0

    def observe(self, request_id: str, wanted: int, proposed: int, accepted: int) -> None:
        """A step asked for `wanted` drafts, got `proposed`, and `accepted` of them passed."""
        if wanted == 0:
            return
        self.counters["spec_decode_k_chosen"] += wanted
        if proposed:
            self.counters["spec_decode_steps"] += 1
            self.counters["spec_decode_proposed_tokens"] += proposed
            self.counters["spec_decode_accepted_tokens"] += accepted
        # Per-token acceptance from this step's run: `accepted` successes, then one failure
        # unless every draft passed. No draft at all counts as a failure: speculating there
        # bought nothing.
        trials = accepted + (1 if accepted < proposed or proposed == 0 else 0)
        rate = accepted / trials
        self._acceptance[request_id] = 0.7 * self.acceptance(request_id) + 0.3 * rate
        self._global = 0.95 * self._global + 0.05 * rate

    def forget(self, request_id: str) -> None:
        self._acceptance.pop(request_id, None)

    def stats(self) -> dict[str, float]:
        c = self.counters
        proposed, steps = c["spec_decode_proposed_tokens"], c["spec_decode_steps"]
        return {
            **c,
            "spec_decode_acceptance_rate": c["spec_decode_accepted_tokens"] / proposed
            if proposed
            else 0.0,
            "spec_decode_mean_accepted_length": c["spec_decode_accepted_tokens"] / steps
            if steps
            else 0.0,
            "spec_decode_mean_k": c["spec_decode_k_chosen"] / steps if steps else 0.0,
            "spec_decode_cost_factor": self.cost_factor,
        }
