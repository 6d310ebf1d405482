"""The step loop of one worker: schedule -> prepare inputs -> execute -> sample or verify -> update.

`Engine` is synchronous and single-threaded; `workers.async_engine.AsyncEngine` drives it from a
background thread for streaming servers. The scheduler owns every request's lifecycle; the
engine wires the parts together and turns each step's tokens into deltas. Everything here runs
and is tested without Ray.
"""

from __future__ import annotations

import itertools
import time
from itertools import accumulate

import torch

from kvstore.kv_payload import BlockPayload
from kvstore.messages import RequestDelta, TokenLogprobs
from kvstore.sampling_params import SamplingParams
from workers.attention.selector import make_attention_backend
from workers.batching_policy import BatchingPolicy, StepTimeModel
from workers.block_pool import BlockPool
from workers.cuda_graphs import DecodeGraphs
from workers.device import resolve_device, resolve_dtype
from workers.engine_config import EngineConfig
from workers.kv_cache import KVCacheManager
from workers.kv_transfer import KVTransfer
from workers.logits_processors import apply_logits_processors
from workers.memory_profile import profiled_kv_budget
from workers.model.config import ModelConfig
from workers.model.loader import load_model
from workers.model.paged_cache import allocate_kv_cache, num_blocks_for_budget
from workers.model.tokenizer import Tokenizer
from workers.model_runner import ModelInputs, ModelRunner
from workers.output_processor import RequestOutputState, make_delta
from workers.policy_factory import make_batching_policy
from workers.request import Request, RequestStatus
from workers.sampler import Sampler, make_generator
from workers.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from workers.spec_decode.config import SpeculativeConfig
from workers.spec_decode.decoder import SpecDecoder
from workers.spec_decode.draft import DraftModelProposer
from workers.step_cost import StepFeatures, step_features
from workers.structured_output import StructuredOutputs, advance

__all__ = ["Engine", "EngineConfig"]


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        torch.manual_seed(config.seed)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.model_config = ModelConfig.from_pretrained(config.model)
        self.tokenizer = Tokenizer.from_pretrained(config.model)
        self.structured = StructuredOutputs(self.tokenizer, self.model_config.vocab_size)
        self.attention = make_attention_backend(
            config.attention_backend, self.device, config.block_size
        )
        self.model = load_model(
            config.model, dtype=self.dtype, device=self.device, backend=self.attention
        )
        self.max_model_len = min(
            config.max_model_len or self.model_config.max_position_embeddings,
            self.model_config.max_position_embeddings,
        )
        num_blocks = config.num_blocks or num_blocks_for_budget(
            self.model_config, config.block_size, self.dtype, self._kv_budget()
        )
        self.kv_caches = allocate_kv_cache(
            self.model_config, num_blocks, config.block_size, self.dtype, self.device
        )
        pool = BlockPool(num_blocks, enable_caching=config.enable_prefix_caching)
        self.kv = KVCacheManager(pool, config.block_size)
        # One fit of what a step of n tokens costs, read by batching and by speculation.
        self.step_time = StepTimeModel()
        sched_config = SchedulerConfig(
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            enable_chunked_prefill=config.enable_chunked_prefill,
        )
        self.scheduler = Scheduler(sched_config, self.kv, self._batching_policy())
        self.spec = self._make_spec_decoder(num_blocks) if config.speculative else None
        self.runner = ModelRunner(
            self.model,
            self.kv_caches,
            self.kv,
            config.max_num_batched_tokens,
            config.max_num_seqs,
            self.max_model_len,
        )
        if self.device.type == "cuda" and not config.enforce_eager:
            self.runner.graphs = self._capture_decode_graphs()
        self.sampler = Sampler()
        self.transfer = None
        if config.enable_kv_sharing:
            if not config.kv_store_secret:
                raise ValueError(
                    "KV sharing needs kv_store_secret (manta serve --kv-store-secret or "
                    "MANTA_KV_STORE_SECRET): payloads from the store are loaded only if their "
                    "MAC under it verifies"
                )
            self.transfer = KVTransfer(
                self.kv, self.kv_caches, config.kv_store_secret.encode(), config.kv_share_after
            )
        self.eos_token_ids = self.tokenizer.eos_token_ids | frozenset(
            self.model_config.eos_token_ids
        )
        self._states: dict[str, RequestOutputState] = {}
        self._ids = itertools.count()
        self.counters = {"steps": 0, "scheduled_tokens": 0, "generation_tokens": 0}
        # What the last step computed and how long it took (seconds): for calibration.
        self.last_step: tuple[StepFeatures, float] | None = None

    def _kv_budget(self) -> int:
        """Bytes for the KV pool: as configured; on CUDA what a profiling forward pass at the
        largest batch leaves of `gpu_memory_utilization` of the GPU; 512 MiB on CPU."""
        config = self.config
        if config.kv_cache_bytes is not None:
            return config.kv_cache_bytes
        if self.device.type != "cuda":
            return 512 * 2**20
        return profiled_kv_budget(
            self.model,
            self.device,
            config.gpu_memory_utilization,
            config.max_num_batched_tokens,
            config.max_num_seqs,
            config.block_size,
        )

    def _capture_decode_graphs(self) -> DecodeGraphs | None:
        if not self.attention.supports_cuda_graphs:
            return None  # the torch backend plans on the host inside forward
        return DecodeGraphs(
            self.model,
            self.kv_caches,
            self.attention,
            self.config.max_num_seqs,
            self.max_model_len,
            self.config.block_size,
        )

    def _batching_policy(self) -> BatchingPolicy:
        config = self.config
        return make_batching_policy(
            config.batching,
            config.max_num_batched_tokens,
            config.max_num_seqs,
            self.step_time,
            config.latency_weight,
            config.learned_policy,
        )

    def _make_spec_decoder(self, num_blocks: int) -> SpecDecoder:
        spec = SpeculativeConfig.from_dict(self.config.speculative)
        draft = None
        if spec.method == "draft":
            draft = DraftModelProposer(
                spec.model,
                self.dtype,
                self.device,
                self.config.block_size,
                spec.draft_num_blocks or num_blocks,
                self.config.max_num_seqs,
                self.max_model_len,
                self.model_config.vocab_size,
            )
        return SpecDecoder(spec, draft, self.step_time)

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
        block_hashes: list[int] | None = None,
    ) -> Request:
        """Queue a request; raises ValueError (naming the problem) if it can never run.

        `block_hashes`: the prompt's block hashes when the caller has them already (the router
        computes them once per prompt). `kv_payloads`: KV blocks of the prompt's prefix
        fetched from the shared block store, loaded into the prefix cache instead of being
        recomputed (after verification)."""
        params = params or SamplingParams()
        token_ids = self._prompt_token_ids(prompt)
        request = Request(
            request_id=request_id or f"req-{next(self._ids)}",
            prompt_token_ids=token_ids,
            params=params,
            arrival_time=time.monotonic(),
            priority=priority,
            generator=make_generator(params.seed, self.device),
            grammar=self._grammar(params, token_ids),
            block_hashes=list(block_hashes or ()),
            block_size=self.config.block_size,
            hash_key=self.hash_key,
            eos_token_ids=self.eos_token_ids,
        )
        self.scheduler.add_request(request)
        self._states[request.request_id] = RequestOutputState(request, self.tokenizer)
        if self.transfer is not None:
            if kv_payloads:
                imported = self.transfer.import_prefix(token_ids, request.block_hashes, kv_payloads)
                request.num_loaded_tokens = imported * self.config.block_size
            self.transfer.observe_prompt(token_ids, request.block_hashes)
        return request

    def _grammar(self, params: SamplingParams, prompt: list[int]):
        """A structured output's matcher, past the tokens a resumed stream generated before."""
        if params.structured_output is None:
            return None
        matcher = self.structured.matcher(*params.structured_output)
        num_resumed = params.resumed_output_tokens
        for token in prompt[len(prompt) - num_resumed :] if num_resumed else []:
            if not matcher.accept_token(token):
                raise ValueError("the resumed tokens do not follow the structured output")
        return matcher

    def _prompt_token_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        token_ids = [int(t) for t in prompt]
        vocab = self.model_config.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are not in the vocabulary [0, {vocab})")
        return token_ids

    def take_exports(self) -> list[BlockPayload]:
        """Hot prompt blocks computed since the last call, for the shared block store."""
        return self.transfer.collect_exports() if self.transfer is not None else []

    def abort_request(self, request_id: str) -> bool:
        """Stop a request now and free its blocks; False if it is unknown or already done."""
        request = self.scheduler.abort(request_id)
        if request is not None:
            self._release([request])
        return request is not None

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- the step ---------------------------------------------------------------------------
    def step(self) -> list[RequestDelta]:
        """Run one step of every scheduled request; returns the deltas of those that emitted."""
        started = time.perf_counter()  # scheduling is part of what a step costs
        out = self._schedule()
        if not out:
            return []
        inputs, num_logits = self._prepare_inputs(out)
        logits = self.runner.execute(inputs)
        sampled, logprobs = self._sample_or_verify(out, logits, num_logits)
        return self._update(out, sampled, logprobs, started)

    def _schedule(self) -> SchedulerOutput:
        """The step's batch, with speculative drafts proposed where slots were given."""
        spec = self.spec
        out = self.scheduler.schedule(spec.plan(self.scheduler.running) if spec else None)
        # A preempted request is recomputed from scratch: its table row and draft KV go.
        self._release(out.preempted, finished=False)
        if spec is not None and out:
            spec.prepare(out)
        return out

    def _prepare_inputs(self, out: SchedulerOutput) -> tuple[ModelInputs, list[int]]:
        """Model inputs for the step, and how many logits rows each request needs (one to
        sample once its prompt is done, one per draft plus one to verify, none mid-prompt)."""
        ids, new_tokens, starts, num_logits = [], [], [], []
        for i, (request, n) in enumerate(zip(out.requests, out.num_scheduled_tokens)):
            start = request.num_computed_tokens
            drafts = out.draft_token_ids.get(i)
            if drafts:
                new_tokens.append(request.token_ids[start:] + drafts)
                num_logits.append(len(drafts) + 1)
            else:
                new_tokens.append(request.token_ids[start : start + n])
                num_logits.append(1 if start + n >= request.num_tokens else 0)
            ids.append(request.request_id)
            starts.append(start)
        return self.runner.prepare_inputs(ids, new_tokens, starts, num_logits), num_logits

    def _sample_or_verify(
        self, out: SchedulerOutput, logits: torch.Tensor, num_logits: list[int]
    ) -> tuple[list[list[int]], dict[int, list[TokenLogprobs]]]:
        """New tokens per request (by batch index) and the logprobs of those that asked."""
        sampled: list[list[int]] = [[] for _ in out.requests]
        logprobs: dict[int, list[TokenLogprobs]] = {}
        row_starts = list(accumulate(num_logits, initial=0))
        plain = [i for i, k in enumerate(num_logits) if k and i not in out.draft_token_ids]
        if plain:
            rows = logits if len(plain) == len(logits) else logits[[row_starts[i] for i in plain]]
            requests = [out.requests[i] for i in plain]
            rows = apply_logits_processors(rows, requests)
            self.structured.apply_masks(rows, requests)
            tokens, lps = self.sampler.sample(
                [r.params for r in requests], [r.generator for r in requests], rows
            )
            for i, token, lp in zip(plain, tokens, lps):
                sampled[i] = [token]
                if lp is not None:
                    logprobs[i] = [lp]
        if out.draft_token_ids:
            for i, tokens in self.spec.verify(out, logits, row_starts).items():
                sampled[i] = tokens
        return sampled, logprobs

    def _update(
        self,
        out: SchedulerOutput,
        sampled: list[list[int]],
        logprobs: dict[int, list[TokenLogprobs]],
        started: float,
    ) -> list[RequestDelta]:
        """Hand the tokens to the scheduler, then turn them into deltas (finishing requests
        whose text reached a stop string) and feed the step time to the models that fit it."""
        features = step_features(out)  # before the scheduler applies the step
        finished = self.scheduler.update_from_output(out, sampled)
        if self.spec is not None:
            self.spec.update(out)
        deltas = []
        for i, request in enumerate(out.requests):
            if sampled[i]:
                if request.grammar is not None and advance(request, sampled[i]):
                    if not request.status.finished:  # the grammar is complete: stop here
                        self.scheduler.finish(request, RequestStatus.FINISHED_STOPPED)
                        finished.append(request)
                state = self._states[request.request_id]
                delta, stopped = make_delta(request, state, sampled[i], logprobs.get(i))
                if stopped and request not in finished:
                    self.scheduler.finish(request, RequestStatus.FINISHED_STOPPED)
                    finished.append(request)
                deltas.append(delta)
        self._release(finished)
        self._record_step(out, features, time.perf_counter() - started, deltas)
        return deltas

    def _record_step(
        self, out: SchedulerOutput, features: StepFeatures, seconds: float, deltas: list
    ) -> None:
        """Feed the step's time to the models that fit it, and count it."""
        self.step_time.observe(out.total_tokens, seconds)
        self.scheduler.policy.observe(features, seconds)
        self.last_step = (features, seconds)
        self.counters["steps"] += 1
        self.counters["scheduled_tokens"] += out.total_tokens
        self.counters["generation_tokens"] += sum(len(d.new_token_ids) for d in deltas)

    def _release(self, requests: list[Request], finished: bool = True) -> None:
        """Drop what is kept beside the scheduler for these requests: table rows, draft KV,
        and for finished ones their text state."""
        ids = [r.request_id for r in requests]
        self.runner.release(ids)
        for rid in ids:
            if finished:
                self._states.pop(rid, None)
            if self.spec is not None:
                self.spec.forget(rid)

    # -- introspection ----------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        stats: dict[str, float] = dict(self.kv.stats())
        stats.update(self.counters)
        stats["num_requests_running"] = self.scheduler.num_running
        stats["num_requests_waiting"] = self.scheduler.num_waiting
        stats["num_preemptions"] = self.scheduler.num_preemptions
        stats["num_deferred_admissions"] = self.scheduler.num_deferred
        stats["kv_cache_usage"] = self.kv.pool.usage
        stats["block_size"] = self.config.block_size
        if self.transfer is not None:
            stats.update(self.transfer.counters)
        if self.spec is not None:
            stats.update(self.spec.stats())
        for key, value in self.scheduler.policy.describe().items():
            stats[f"batching_{key}"] = value
        return stats
