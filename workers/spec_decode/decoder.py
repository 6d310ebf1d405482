"""Speculative decoding inside the engine's step: choose k, propose, verify, roll back.

The engine asks `plan` before scheduling (request id -> k, so the scheduler reserves k draft
slots for each decoding request and carries k in its output), `prepare` after it (drafts are
proposed and set on the scheduler output), and `verify` after the target's forward pass, which
scored every draft plus one more position per request in the same batch as everyone else.
After the scheduler has kept what verification accepted, `update` rolls the draft model's own
KV back to match; `forget` drops a finished or preempted request.
"""

from __future__ import annotations

import time

import torch

from workers.batching_policy import StepTimeModel
from workers.logits_processors import steers_logits
from workers.request import Request
from workers.sampler import SamplingBatch, probs_from_logits
from workers.scheduler import SchedulerOutput
from workers.spec_decode.config import SpeculativeConfig
from workers.spec_decode.draft import DraftModelProposer
from workers.spec_decode.ngram import NgramProposer
from workers.spec_decode.policy import SpeculationPolicy
from workers.spec_decode.rejection import verify_greedy, verify_sampled


class SpecDecoder:
    def __init__(
        self,
        config: SpeculativeConfig,
        draft: DraftModelProposer | None,
        step_time: StepTimeModel,
    ) -> None:
        self.config = config
        self.draft = draft
        self.step_time = step_time
        self.ngram = (
            NgramProposer(config.ngram_max, config.ngram_min) if config.method == "ngram" else None
        )
        fixed = None if config.adaptive else int(config.num_speculative_tokens)
        self.policy = SpeculationPolicy(fixed, config.max_speculative_tokens)
        self._draft_probs: dict[int, torch.Tensor | None] = {}  # this step's, by batch index
        self._k: dict[str, int] = {}  # k asked for per request this step
        self._prepare_started = 0.0

    def plan(self, running: list[Request]) -> dict[str, int]:
        """Draft slots for this step: k for each decoding request (none for requests that want
        logprobs, whose per-token logprobs would have to be recomputed, nor for requests with
        penalties, a logit bias, min_tokens or a structured output, whose logits depend on the
        tokens before each draft, nor for a request's last token)."""
        decoding = [
            r
            for r in running
            if r.num_tokens - r.num_computed_tokens == 1
            and r.params.logprobs is None
            and not steers_logits(r.params)
            and r.params.structured_output is None
        ]
        draft_s = catch_up_s = 0.0
        if self.draft is not None:
            draft_s = self.draft.step_seconds
            catch_up_s = self.draft.catch_up_seconds(decoding)
        k = self.policy.choose(
            [r.request_id for r in decoding],
            self.step_time.overhead,
            self.step_time.per_token,
            draft_s,
            catch_up_s,
        )
        self._k = {
            r.request_id: max(0, min(k, r.params.max_tokens - r.num_output_tokens - 1))
            for r in decoding
        }
        return {rid: k for rid, k in self._k.items() if k}

    def prepare(self, out: SchedulerOutput) -> float:
        """Propose drafts for the scheduled requests that have draft slots and set them on
        `out`; returns the seconds spent proposing."""
        started = self._prepare_started = time.perf_counter()
        self._draft_probs = {}
        room = [i for i, slots in enumerate(out.num_draft_slots) if slots]
        if not room:
            return 0.0
        requests = [out.requests[i] for i in room]
        proposals = self._propose(requests, [out.num_draft_slots[i] for i in room])
        for i, request, (tokens, q) in zip(room, requests, proposals):
            if tokens:
                out.set_drafts(i, tokens)
                self._draft_probs[i] = q
            else:  # no n-gram match, or the draft pool is full: speculating bought nothing
                self.policy.observe(request.request_id, self._k.get(request.request_id, 0), 0, 0)
        return time.perf_counter() - started

    def verify(
        self, out: SchedulerOutput, logits: torch.Tensor, row_starts: list[int]
    ) -> dict[int, list[int]]:
        """Tokens each verified request emits (its accepted drafts plus one from the target),
        by batch index; `logits` rows from `row_starts[i]` score request i's drafts."""
        emitted: dict[int, list[int]] = {}
        indices = sorted(out.draft_token_ids)
        for greedy in (True, False):
            group = [i for i in indices if out.requests[i].params.greedy == greedy]
            if not group:
                continue
            drafts = [out.draft_token_ids[i] for i in group]
            rows = torch.cat(
                [
                    torch.arange(row_starts[i], row_starts[i] + len(d) + 1)
                    for i, d in zip(group, drafts)
                ]
            )
            requests = [out.requests[i] for i in group]
            if greedy:
                outs = verify_greedy(logits[rows], drafts)
            else:
                outs = self._verify_sampled(requests, drafts, group, logits[rows])
            for i, request, draft, tokens in zip(group, requests, drafts, outs):
                emitted[i] = tokens
                rid = request.request_id
                self.policy.observe(rid, self._k.get(rid, 0), len(draft), len(tokens) - 1)
                request.num_spec_proposed += len(draft)
                request.num_spec_accepted += len(tokens) - 1
        return emitted

    def update(self, out: SchedulerOutput) -> None:
        """After the scheduler's update: the draft model's KV rolls back to the tokens the
        target kept, and the whole speculative step's time (proposing included) feeds the
        policy's cost correction."""
        if not out.draft_token_ids:
            return
        if self.draft is not None:
            for i in out.draft_token_ids:
                request = out.requests[i]
                if not request.status.finished:
                    self.draft.sync(request)
        self.policy.observe_step_time(time.perf_counter() - self._prepare_started)

    def forget(self, request_id: str) -> None:
        self.policy.forget(request_id)
        if self.draft is not None:
            self.draft.forget(request_id)

    def stats(self) -> dict[str, float]:
        return self.policy.stats()

    def _propose(self, requests: list[Request], ks: list[int]) -> list[tuple[list[int], object]]:
        """Draft tokens (at most ks[i]) and draft distributions (None: deterministic/greedy)."""
        if self.ngram is not None:
            return [(self.ngram.propose(r.token_ids, k), None) for r, k in zip(requests, ks)]
        proposals = self.draft.propose(requests, max(ks))
        return [(tokens[:k], None if q is None else q[:k]) for (tokens, q), k in zip(proposals, ks)]

    def _verify_sampled(self, requests, drafts, group, logits):
        params, generators = [], []
        for r, d in zip(requests, drafts):
            params += [r.params] * (len(d) + 1)
            generators += [r.generator] * (len(d) + 1)
        batch = SamplingBatch.from_params(params, generators, logits.shape[-1], logits.device)
        target = probs_from_logits(logits, batch)
        draft_probs = [self._draft_probs.get(i) for i in group]
        return verify_sampled(target, drafts, draft_probs, [r.generator for r in requests])
