"""Speculative decoding inside the engine's step: choose k, propose, verify, roll back.

The engine asks `plan` before scheduling (so the scheduler reserves k extra slots for each
decoding request), `propose` after it, and `verify` after the target's forward pass, which
scored every draft plus one more position per request in the same batch as everyone else.
"""

from __future__ import annotations

import torch

from workers.request import Request
from workers.sampler import SamplingBatch, probs_from_logits
from workers.spec_decode.config import SpeculativeConfig
from workers.spec_decode.draft import DraftModelProposer
from workers.spec_decode.ngram import NgramProposer
from workers.spec_decode.policy import SpeculationPolicy
from workers.spec_decode.rejection import verify_greedy, verify_sampled


class SpecDecoder:
    def __init__(self, config: SpeculativeConfig, draft: DraftModelProposer | None) -> None:
        self.config = config
        self.draft = draft
        self.ngram = (
            NgramProposer(config.ngram_max, config.ngram_min) if config.method == "ngram" else None
        )
        fixed = None if config.adaptive else int(config.num_speculative_tokens)
        self.policy = SpeculationPolicy(fixed, config.max_speculative_tokens)

    def plan(self, running: list[Request], overhead_s: float, per_token_s: float) -> None:
        """Set `spec_k` on every running request: k for those decoding, 0 for the rest."""
        decoding = []
        for r in running:
            r.spec_k = 0
            # Requests that want logprobs are not speculated (their per-token logprobs would
            # have to be recomputed); nor are the last tokens of a request.
            if r.num_tokens - r.num_computed_tokens == 1 and r.params.logprobs is None:
                decoding.append(r)
        draft_s = catch_up_s = 0.0
        if self.draft is not None:
            draft_s = self.draft.step_seconds
            catch_up_s = self.draft.catch_up_seconds(decoding)
        k = self.policy.choose(
            [r.request_id for r in decoding], overhead_s, per_token_s, draft_s, catch_up_s
        )
        for r in decoding:
            r.spec_k = max(0, min(k, r.params.max_tokens - r.num_output_tokens - 1))

    def propose(self, requests: list[Request], ks: list[int]) -> list[tuple[list[int], object]]:
        """Draft tokens (at most ks[i]) and draft distributions (None: deterministic/greedy)."""
        if not requests:
            return []
        if self.ngram is not None:
            return [(self.ngram.propose(r.token_ids, k), None) for r, k in zip(requests, ks)]
        proposals = self.draft.propose(requests, max(ks))
        return [(tokens[:k], None if q is None else q[:k]) for (tokens, q), k in zip(proposals, ks)]

    def verify(
        self,
        requests: list[Request],
        drafts: list[list[int]],
        draft_probs: list,
        logits: torch.Tensor,  # [sum(len(d) + 1), V]: each request's scored positions in order
    ) -> list[list[int]]:
        """Tokens each request emits: its accepted drafts plus one from the target."""
        emitted: list[list[int]] = [[] for _ in requests]
        greedy = [i for i, r in enumerate(requests) if r.params.greedy]
        sampled = [i for i, r in enumerate(requests) if not r.params.greedy]
        starts, offset = [], 0
        for d in drafts:
            starts.append(offset)
            offset += len(d) + 1
        for group, fn in ((greedy, self._greedy), (sampled, self._sampled)):
            if group:
                rows = torch.cat(
                    [torch.arange(starts[i], starts[i] + len(drafts[i]) + 1) for i in group]
                )
                for i, out in zip(
                    group,
                    fn(
                        [requests[i] for i in group],
                        [drafts[i] for i in group],
                        [draft_probs[i] for i in group],
                        logits[rows],
                    ),
                ):
                    emitted[i] = out
        for r, d, out in zip(requests, drafts, emitted):
            self.policy.observe(r.request_id, r.spec_k, len(d), len(out) - 1)
        return emitted

    def observe_empty(self, requests: list[Request]) -> None:
        """Requests that had room for drafts but got none (no n-gram match, draft pool full)."""
        for r in requests:
            self.policy.observe(r.request_id, r.spec_k, 0, 0)

    def _greedy(self, requests, drafts, draft_probs, logits):
        return verify_greedy(logits, drafts)

    def _sampled(self, requests, drafts, draft_probs, logits):
        params, generators = [], []
        for r, d in zip(requests, drafts):
            params += [r.params] * (len(d) + 1)
            generators += [r.generator] * (len(d) + 1)
        batch = SamplingBatch.from_params(params, generators, logits.shape[-1], logits.device)
        target = probs_from_logits(logits, batch)
        return verify_sampled(target, drafts, draft_probs, [r.generator for r in requests])

    def sync(self, request: Request) -> None:
        if self.draft is not None:
            self.draft.sync(request)

    def forget(self, request_id: str) -> None:
        self.policy.forget(request_id)
        if self.draft is not None:
            self.draft.forget(request_id)

    def stats(self) -> dict[str, float]:
        return self.policy.stats()
