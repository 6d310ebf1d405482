"""The step loop of one worker: schedule -> prepare inputs -> forward -> sample -> update -> emit.

`Engine` is synchronous and single-threaded; `workers.async_engine.AsyncEngine` drives it from a
background thread for streaming servers. Everything here runs and is tested without Ray.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import torch

from kvstore.block_store import BlockPayload
from workers.batching_policy import (
    AdaptiveBatchingPolicy,
    BatchingPolicy,
    FixedBatchingPolicy,
    StepTimeModel,
)
from workers.block_pool import BlockPool
from workers.kv_cache import KVCacheManager
from workers.kv_transfer import KVTransfer
from workers.model.config import ModelConfig
from workers.model.loader import load_model
from workers.model.paged_cache import allocate_kv_cache, num_blocks_for_budget
from workers.model.tokenizer import Tokenizer
from workers.model_runner import ModelRunner
from workers.output_processor import RequestOutputState, process_token
from workers.outputs import RequestDelta, TokenLogprobs
from workers.request import Request
from workers.sampler import Sampler, SamplingBatch, make_generator
from workers.sampling_params import SamplingParams
from workers.scheduler import Scheduler, SchedulerConfig
from workers.spec_decode.config import MAX_SPECULATIVE_TOKENS, SpeculativeConfig
from workers.spec_decode.decoder import SpecDecoder
from workers.spec_decode.draft import DraftModelProposer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(slots=True)
class EngineConfig:
    model: str
    # Identity of the weights, part of every block hash: workers and router must agree on it.
    model_id: str | None = None  # default: the model directory
    dtype: str = "float32"
    device: str = "cpu"
    block_size: int = 16
    # The KV pool, allocated once at start; None: a fraction of free GPU memory on CUDA (after
    # the weights are loaded), 512 MiB on CPU.
    kv_cache_bytes: int | None = None
    gpu_memory_utilization: float = 0.9
    num_blocks: int | None = None  # overrides kv_cache_bytes (tests, exact pool sizes)
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    batching: str = "adaptive"  # "adaptive" or "fixed"
    latency_weight: float = 1.0  # adaptive batching: running requests' latency vs the queue's
    # Export hot prompt blocks for other workers and accept theirs (see workers/kv_transfer.py).
    enable_kv_sharing: bool = False
    # {"method": "ngram" | "draft", "num_speculative_tokens": k | "auto", "model": DIR, ...}
    speculative: dict | None = None
    kv_share_after: int = 2  # prompts a block must appear in before it is exported
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.batching not in ("adaptive", "fixed"):
            raise ValueError(f"batching must be 'adaptive' or 'fixed', got {self.batching!r}")


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        torch.manual_seed(config.seed)
        dtype = self.dtype = DTYPES[config.dtype]
        self.model_config = ModelConfig.from_pretrained(config.model)
        self.tokenizer = Tokenizer.from_pretrained(config.model)
        self.model = load_model(config.model, dtype=dtype, device=config.device)
        self.max_model_len = min(
            config.max_model_len or self.model_config.max_position_embeddings,
            self.model_config.max_position_embeddings,
        )
        num_blocks = config.num_blocks or num_blocks_for_budget(
            self.model_config, config.block_size, dtype, self._kv_budget()
        )
        self.kv_caches = allocate_kv_cache(
            self.model_config, num_blocks, config.block_size, dtype, config.device
        )
        pool = BlockPool(num_blocks, enable_caching=config.enable_prefix_caching)
        # The model's identity keys every block hash, so two models never share cached KV.
        self.kv = KVCacheManager(pool, config.block_size, extra_key=self.hash_key)
        sched_config = SchedulerConfig(
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            enable_chunked_prefill=config.enable_chunked_prefill,
        )
        policy: BatchingPolicy
        if config.batching == "fixed":
            policy = FixedBatchingPolicy(config.max_num_batched_tokens, config.max_num_seqs)
        else:
            policy = AdaptiveBatchingPolicy(
                config.max_num_batched_tokens, config.max_num_seqs, config.latency_weight
            )
        self.scheduler = Scheduler(sched_config, self.kv, policy)
        self.spec = self._make_spec_decoder(num_blocks) if config.speculative else None
        self.step_time = StepTimeModel()  # what a step of n tokens costs, for speculation
        self.runner = ModelRunner(
            self.model,
            self.kv_caches,
            config.block_size,
            config.max_num_batched_tokens,
            config.max_num_seqs,
            self.max_model_len,
            max_query_tokens_per_seq=MAX_SPECULATIVE_TOKENS + 1 if self.spec else 1,
        )
        self.sampler = Sampler()
        self.transfer = (
            KVTransfer(self.kv, self.kv_caches, config.kv_share_after)
            if config.enable_kv_sharing
            else None
        )
        self.eos_token_ids = self.tokenizer.eos_token_ids | frozenset(
            self.model_config.eos_token_ids
        )
        self._states: dict[str, RequestOutputState] = {}
        self._ids = itertools.count()
        self.counters = {"steps": 0, "scheduled_tokens": 0, "generation_tokens": 0}

    def _kv_budget(self) -> int:
        if self.config.kv_cache_bytes is not None:
            return self.config.kv_cache_bytes
        if torch.device(self.config.device).type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.config.device)
            return int(free * self.config.gpu_memory_utilization)
        return 512 * 2**20

    def _make_spec_decoder(self, num_blocks: int) -> SpecDecoder:
        spec = SpeculativeConfig.from_dict(self.config.speculative)
        draft = None
        if spec.method == "draft":
            draft = DraftModelProposer(
                spec.model,
                self.dtype,
                self.config.device,
                self.config.block_size,
                spec.draft_num_blocks or num_blocks,
                self.config.max_num_seqs,
                self.max_model_len,
                self.hash_key,
                self.model_config.vocab_size,
            )
        return SpecDecoder(spec, draft)

    @property
    def hash_key(self) -> bytes:
        return (self.config.model_id or self.config.model).encode()

    # -- requests ---------------------------------------------------------------------------
    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
        kv_payloads: list[BlockPayload] | None = None,
    ) -> Request:
        """Queue a request; raises ValueError (naming the problem) if it can never run.

        `kv_payloads`: KV blocks of the prompt's prefix fetched from the shared block store,
        loaded into the prefix cache instead of being recomputed (after verification)."""
        params = params or SamplingParams()
        if isinstance(prompt, str):
            token_ids = self.tokenizer.encode(prompt)
        else:
            token_ids = [int(t) for t in prompt]
            vocab = self.model_config.vocab_size
            bad = [t for t in token_ids if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"token ids {bad[:5]} are not in the vocabulary [0, {vocab})")
        request = Request(
            request_id=request_id or f"req-{next(self._ids)}",
            prompt_token_ids=token_ids,
            params=params,
            arrival_time=time.monotonic(),
            priority=priority,
            generator=make_generator(params.seed, self.config.device),
        )
        self.scheduler.add_request(request)
        self._states[request.request_id] = RequestOutputState(request, self.tokenizer)
        if self.transfer is not None:
            if kv_payloads:
                self.transfer.import_prefix(token_ids, kv_payloads)
            self.transfer.observe_prompt(token_ids, self.transfer.block_hashes(token_ids))
        return request

    def take_exports(self) -> list[BlockPayload]:
        """Hot prompt blocks computed since the last call, for the shared block store."""
        return self.transfer.collect_exports() if self.transfer is not None else []

    def abort_request(self, request_id: str) -> bool:
        """Stop a request now and free its blocks; False if it is unknown or already done."""
        self._forget(request_id)
        return self.scheduler.abort(request_id) is not None

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- the step ---------------------------------------------------------------------------
    def step(self) -> list[RequestDelta]:
        spec = self.spec
        if spec is not None:
            spec.plan(self.scheduler.running, self.step_time.overhead, self.step_time.per_token)
        out = self.scheduler.schedule()
        if spec is not None:
            for request in out.preempted:  # its draft KV is recomputed with its target KV
                spec.forget(request.request_id)
        if not out:
            return []
        started = time.perf_counter()
        requests, counts = out.requests, out.num_scheduled_tokens
        drafts: list[list[int]] = [[] for _ in requests]
        draft_probs: list = [None] * len(requests)
        if spec is not None:
            room = [
                i
                for i, (r, n) in enumerate(zip(requests, counts))
                if r.spec_k and n > 1 and r.num_tokens - r.num_computed_tokens == 1
            ]
            proposing = time.perf_counter()
            proposals = spec.propose([requests[i] for i in room], [counts[i] - 1 for i in room])
            for i, (tokens, q) in zip(room, proposals):
                drafts[i], draft_probs[i], counts[i] = tokens, q, 1 + len(tokens)
            spec.observe_empty([requests[i] for i in room if not drafts[i]])
            started += time.perf_counter() - proposing  # the step model fits the target only
        # A request samples once its scheduled tokens reach the end of what it knows.
        sampling = [r.num_computed_tokens + n >= r.num_tokens for r, n in zip(requests, counts)]
        rows = [
            list(range(n)) if d else [n - 1] if s else []
            for n, d, s in zip(counts, drafts, sampling)
        ]
        logits = self.runner.execute(
            [r.token_ids + d if d else r.token_ids for r, d in zip(requests, drafts)],
            [r.num_computed_tokens for r in requests],
            counts,
            [self.kv.block_table(r.request_id) for r in requests],
            rows,
        )
        offsets = [0]
        for r in rows:
            offsets.append(offsets[-1] + len(r))
        emitted: list[list[int]] = [[] for _ in requests]
        logprobs: list = [None] * len(requests)
        plain = [i for i, s in enumerate(sampling) if s and not drafts[i]]
        if plain:
            tokens, lps = self._sample(
                [requests[i] for i in plain], logits[[offsets[i] for i in plain]]
            )
            for i, token, lp in zip(plain, tokens, lps):
                emitted[i], logprobs[i] = [token], lp
        verified = [i for i, d in enumerate(drafts) if d]
        if verified:
            spans = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in verified])
            outs = spec.verify(
                [requests[i] for i in verified],
                [drafts[i] for i in verified],
                [draft_probs[i] for i in verified],
                logits[spans],
            )
            for i, tokens in zip(verified, outs):
                emitted[i] = tokens
        deltas, finishing = [], []
        for i, (request, tokens) in enumerate(zip(requests, emitted)):
            if tokens:
                delta, status = self._emit(request, tokens, logprobs[i])
                deltas.append(delta)
                if status is not None:
                    finishing.append((request, status))
        # KV is valid for the last token known before the step plus the accepted drafts. It is
        # committed (full blocks cached) before finished requests give their blocks back.
        computed = [len(e) if d else n for n, d, e in zip(counts, drafts, emitted)]
        self.scheduler.update_after_step(out, computed)
        for i in verified:
            self.kv.truncate(requests[i].request_id, requests[i].num_computed_tokens)
            spec.sync(requests[i])
        for request, status in finishing:
            self.scheduler.finish(request, status)
            self._forget(request.request_id)
        seconds = time.perf_counter() - started
        if verified:
            spec.policy.observe_step_time(time.perf_counter() - proposing)
        self.scheduler.policy.observe(out.total_tokens, len(requests), seconds)
        self.step_time.observe(out.total_tokens, seconds)
        self.counters["steps"] += 1
        self.counters["scheduled_tokens"] += out.total_tokens
        self.counters["generation_tokens"] += sum(len(e) for e in emitted)
        return deltas

    def _sample(self, requests: list[Request], logits: torch.Tensor):
        """One token per request, with its logprobs when the request asked for them."""
        batch = SamplingBatch.from_params(
            [r.params for r in requests],
            [r.generator for r in requests],
            logits.shape[-1],
            device=logits.device,
        )
        sampled = self.sampler(logits, batch, batch.max_num_logprobs)
        token_ids = sampled.token_ids.tolist()
        logprobs: list[TokenLogprobs | None] = []
        for i, request in enumerate(requests):
            if request.params.logprobs is None or sampled.logprobs is None:
                logprobs.append(None)
                continue
            top = {}
            if sampled.top_logprobs is not None and request.params.logprobs:
                k = request.params.logprobs
                values, ids = sampled.top_logprobs
                top = dict(zip(ids[i, :k].tolist(), values[i, :k].tolist()))
            logprobs.append(TokenLogprobs(token_ids[i], float(sampled.logprobs[i]), top))
        return token_ids, logprobs

    def _emit(self, request: Request, tokens: list[int], logprobs):
        """Append the step's tokens (one, or several after verification) until one ends the
        request; returns the merged delta and the finish status, if any."""
        state = self._states[request.request_id]
        merged, status = None, None
        for token in tokens:
            delta, status = process_token(request, state, token, self.eos_token_ids, logprobs)
            if merged is None:
                merged = delta
            else:
                merged.new_token_ids += delta.new_token_ids
                merged.new_text += delta.new_text
                merged.finished, merged.finish_reason = delta.finished, delta.finish_reason
                merged.num_output_tokens = delta.num_output_tokens
            if status is not None:
                break
        return merged, status

    def _forget(self, request_id: str) -> None:
        """Drop per-request state kept beside the scheduler (output, draft KV)."""
        self._states.pop(request_id, None)
        if self.spec is not None:
            self.spec.forget(request_id)

    # -- introspection ----------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        stats: dict[str, float] = dict(self.kv.stats())
        stats.update(self.counters)
        stats["num_requests_running"] = self.scheduler.num_running
        stats["num_requests_waiting"] = self.scheduler.num_waiting
        stats["num_preemptions"] = self.scheduler.num_preemptions
        stats["kv_cache_usage"] = self.kv.pool.usage
        stats["block_size"] = self.config.block_size
        if self.transfer is not None:
            stats.update(self.transfer.counters)
        if self.spec is not None:
            stats.update(self.spec.stats())
        for key, value in self.scheduler.policy.describe().items():
            stats[f"batching_{key}"] = value
        return stats
