"""The draft-model proposer: a smaller checkpoint run by the same model code, with its own KV
pool and prefix cache, so a shared system prompt's draft KV is computed once and reused.

The draft keeps, per request, how many of the request's tokens have draft KV. Proposing first
catches up (a draft prefill of whatever it has not seen, prefix-cached), then runs k one-token
steps. After verification, `sync` rolls the draft back to the tokens the target accepted.
"""

from __future__ import annotations

import time

import torch

from workers.block_pool import BlockPool
from workers.kv_cache import KVCacheManager
from workers.model.loader import load_model
from workers.model.paged_cache import allocate_kv_cache
from workers.model_runner import ModelRunner
from workers.request import Request
from workers.sampler import SamplingBatch, probs_from_logits, sample_from_probs

CATCH_UP_TOKENS = 2048  # the most draft prefill tokens in one forward pass
# Tokens a request may be behind when proposing starts: they ride along in the first draft
# step instead of costing a forward pass of their own (after verification a request is
# typically a few accepted tokens behind).
FOLD_TOKENS = 16


class DraftModelProposer:
    def __init__(
        self,
        model_dir: str,
        dtype: torch.dtype,
        device: str,
        block_size: int,
        num_blocks: int,
        max_num_seqs: int,
        max_model_len: int,
        target_vocab_size: int,
    ) -> None:
        self.model = load_model(model_dir, dtype=dtype, device=device)
        config = self.model.config
        if config.vocab_size != target_vocab_size:
            raise ValueError(
                f"the draft model's vocabulary ({config.vocab_size}) differs from the target's "
                f"({target_vocab_size}): a draft must share the target's tokenizer"
            )
        self.kv_caches = allocate_kv_cache(config, num_blocks, block_size, dtype, device)
        # Its own pool, so the target's block hashes (Request.block_hashes) key it as well.
        self.kv = KVCacheManager(BlockPool(num_blocks), block_size)
        self.runner = ModelRunner(
            self.model,
            self.kv_caches,
            self.kv,
            max(CATCH_UP_TOKENS, max_num_seqs * (FOLD_TOKENS + 1)),
            max_num_seqs,
            max_model_len,
        )
        self._computed: dict[str, int] = {}
        self.step_seconds = 0.0  # measured cost of one draft step, for the policy
        self.prefill_seconds_per_token = 0.0  # measured cost of the draft catching up

    def catch_up_seconds(self, requests: list[Request]) -> float:
        """Predicted cost of the draft prefill these requests would need before proposing."""
        behind = sum(max(0, r.num_tokens - self._computed.get(r.request_id, 0)) for r in requests)
        return behind * self.prefill_seconds_per_token

    def propose(
        self, requests: list[Request], k: int
    ) -> list[tuple[list[int], torch.Tensor | None]]:
        """Up to k draft tokens per request, with their draft distributions (None if greedy)."""
        live = [r for r in requests if self._reserve(r, r.num_tokens + k - 1)]
        behind = sum(r.num_tokens - 1 - self._computed[r.request_id] for r in live)
        catching_up = time.perf_counter()
        self._catch_up(live)
        started = time.perf_counter()
        if behind > FOLD_TOKENS * max(1, len(live)):
            rate = (started - catching_up) / behind
            self.prefill_seconds_per_token = (
                0.8 * self.prefill_seconds_per_token + 0.2 * rate
            )  # the draft's own prefill is not a per-draft cost
        drafts: dict[str, list[int]] = {r.request_id: [] for r in live}
        probs: dict[str, list[torch.Tensor]] = {r.request_id: [] for r in live}
        ids = [r.request_id for r in live]
        for step in range(k):
            if step == 0:  # whatever the request is behind, plus its last token
                starts = [self._computed[rid] for rid in ids]
                new = [r.token_ids[start:] for r, start in zip(live, starts)]
            else:
                starts = [r.num_tokens - 1 + step for r in live]
                new = [drafts[rid][-1:] for rid in ids]
            inputs = self.runner.prepare_inputs(ids, new, starts, [1] * len(live))
            logits = self.runner.execute(inputs)
            tokens, rows = self._sample(live, logits)
            for r, token, row in zip(live, tokens, rows):
                drafts[r.request_id].append(token)
                if row is not None:
                    probs[r.request_id].append(row)
        for r in live:
            self._computed[r.request_id] = r.num_tokens + k - 1
        if live and k:
            seconds = (time.perf_counter() - started) / k
            self.step_seconds = 0.8 * self.step_seconds + 0.2 * seconds
        out = []
        for r in requests:
            if r.request_id not in drafts:
                out.append(([], None))
                continue
            rows = probs[r.request_id]
            out.append((drafts[r.request_id], torch.stack(rows) if rows else None))
        return out

    def sync(self, request: Request) -> None:
        """Keep draft KV only for tokens the target has verified (rejected drafts roll back)."""
        rid = request.request_id
        if rid not in self._computed:
            return
        valid = min(self._computed[rid], request.num_computed_tokens)
        self._computed[rid] = valid
        self.kv.commit(rid, request.token_ids, valid, request.block_hashes)
        self.kv.truncate(rid, valid)

    def forget(self, request_id: str) -> None:
        self._computed.pop(request_id, None)
        self.kv.free(request_id)
        self.runner.release([request_id])

    # -- internals --------------------------------------------------------------------------
    def _reserve(self, request: Request, num_slots: int) -> bool:
        rid = request.request_id
        if rid in self._computed:
            return self.kv.allocate_slots(rid, num_slots)
        match = self.kv.match_prefix(request.token_ids, request.block_hashes)
        if not self.kv.allocate_slots(rid, num_slots, prefix=match):
            return False
        self._computed[rid] = match.num_cached_tokens
        return True

    def _catch_up(self, requests: list[Request]) -> None:
        """Draft KV until each request is at most FOLD_TOKENS behind its last token (a chunked
        draft prefill)."""
        while True:
            batch, counts, budget = [], [], CATCH_UP_TOKENS
            for r in requests:
                behind = r.num_tokens - 1 - self._computed[r.request_id]
                if behind > FOLD_TOKENS and budget > 0:
                    batch.append(r)
                    counts.append(min(behind, budget))
                    budget -= counts[-1]
            if not batch:
                return
            ids = [r.request_id for r in batch]
            starts = [self._computed[rid] for rid in ids]
            new = [r.token_ids[start : start + n] for r, start, n in zip(batch, starts, counts)]
            self.runner.execute(self.runner.prepare_inputs(ids, new, starts, [0] * len(batch)))
            for r, n in zip(batch, counts):
                self._computed[r.request_id] += n

    def _sample(self, requests: list[Request], logits: torch.Tensor):
        """Greedy requests take the draft's argmax; others sample from its distribution."""
        tokens = logits.argmax(-1).tolist()
        rows: list[torch.Tensor | None] = [None] * len(requests)
        sampled = [i for i, r in enumerate(requests) if not r.params.greedy]
        if sampled:
            batch = SamplingBatch.from_params(
                [requests[i].params for i in sampled],
                [requests[i].generator for i in sampled],
                logits.shape[-1],
            )
            q = probs_from_logits(logits[sampled], batch)
            picks = sample_from_probs(q, batch.generators).tolist()
            for j, i in enumerate(sampled):
                tokens[i], rows[i] = picks[j], q[j]
        return tokens, rows
