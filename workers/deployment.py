"""A worker: one engine, streaming deltas to the router; and the Ray Serve deployment around it.

Serve gives health checks, replica restarts and autoscaling for free, and its pluggable request
router lets the front pick the replica per request (see router/prefix_router.py), which is why
workers are a deployment rather than hand-managed actors. Each replica publishes its block
pool's stored/evicted events to the prefix index in batches, and its load for routing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator

import ray
from opentelemetry.trace import set_span_in_context
from ray import serve

from kvstore.block_store import BlockStore
from kvstore.index import PrefixIndex, make_index
from kvstore.index_actor import ActorPrefixIndex, ActorWorkerReports
from kvstore.messages import (
    GenerateRequest,
    RequestDelta,
    RequestRejectedError,
    WorkerOverloadedError,
)
from kvstore.telemetry import extract, make_tracer
from kvstore.worker_reports import Reports
from workers.admission import AdmissionControl
from workers.async_engine import AsyncEngine
from workers.engine import EngineConfig
from workers.kv_transfer import LoadCostModel
from workers.model.paged_cache import kv_block_bytes

logger = logging.getLogger(__name__)


class Worker:
    """One engine and what it shares: KV events to the prefix index, load and counters to the
    reports (what /metrics shows), hot prompt blocks to the block store. A `WorkerDeployment`
    replica holds one; so does a co-located ingress (cluster/colocated.py), which calls
    `generate` in its own process."""

    def __init__(
        self,
        engine_config: EngineConfig,
        worker_id: str,
        index: PrefixIndex,
        reports: Reports,
        namespace: str,
        redis_url: str | None = None,
        publish_interval_s: float = 0.2,
        max_in_flight: int = 256,
        stream_interval_s: float = 0.0,
        slo_ttft_s: float | None = None,
        slo_itl_s: float | None = None,
        worker_name: str | None = None,
        tracing: dict | None = None,
    ) -> None:
        self.engine = AsyncEngine(engine_config)
        # Policies that plan by the SLOs (batching="learned") learn them here.
        self.engine.engine.scheduler.policy.set_targets(slo_ttft_s, slo_itl_s)
        self.admission = AdmissionControl(
            slo_ttft_s,
            engine_config.max_num_batched_tokens,
            self.engine.engine.step_time,
            engine_config.max_num_seqs,
            slo_itl_s,
        )
        self.worker_id = worker_id
        self.worker_name = worker_name or worker_id  # the `worker` label in /metrics
        # Ray's id of the node: told apart even where nodes share an address (one machine).
        self.node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        self.index = index
        self.reports = reports
        self.max_in_flight = max_in_flight  # requests running or queued here at once
        self._in_flight = 0
        # (request id, seconds to its first token) of the latest requests, for routers that
        # learn to predict it (router/latency_predictor.py); a routing-stats period's worth.
        self._first_tokens: deque[tuple[str, float]] = deque(maxlen=256)
        self.publish_interval_s = publish_interval_s
        self.stream_interval_s = stream_interval_s
        # Hot system-prompt KV is shared through Redis when the cluster has one.
        self.block_store = BlockStore(redis_url, namespace) if redis_url else None
        self.load_cost = LoadCostModel()
        self.tracer = make_tracer(tracing, "manta-worker")
        self.block_bytes = kv_block_bytes(
            self.engine.engine.model_config, engine_config.block_size, self.engine.engine.dtype
        )
        self._publisher = asyncio.get_running_loop().create_task(self._publish_loop())

    async def _publish_loop(self) -> None:
        while True:
            try:
                # First, before a publish marks this worker alive again: has the index lost
                # what it holds (Redis restarted empty, or events dropped while it was away)?
                if not await self.index.heartbeat(self.worker_id):
                    self.engine.republish_cache()
                events = self.engine.take_events()
                if events:
                    await self.index.publish(self.worker_id, events)
                exports = self.engine.take_exports()
                if exports and self.block_store is not None:
                    await self.block_store.put(exports)
                await self.reports.report(self.worker_id, self.stats())
            except Exception:  # the index is an accelerator: never let it stop the worker
                logger.exception("publishing KV events failed")
            await asyncio.sleep(self.publish_interval_s)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[RequestDelta]:
        self._admit(request)
        num_prompt = len(request.prompt_token_ids)
        self._in_flight += 1
        self.admission.admitted(num_prompt, request.sampling.max_tokens)
        waiting, received = True, time.perf_counter()
        try:
            async for delta in self._generate(request):
                if waiting:
                    self.admission.started(num_prompt)
                    self._first_tokens.append((request.request_id, time.perf_counter() - received))
                    waiting = False
                if delta.finished and self.tracer is not None and request.trace_context:
                    record_spans(self.tracer, request, delta, self.worker_name)
                yield delta
        finally:
            self._in_flight -= 1
            if waiting:
                self.admission.started(num_prompt)

    def _admit(self, request: GenerateRequest) -> None:
        """Refuse (WorkerOverloadedError, with seconds to wait) what would miss the TTFT SLO
        or exceed the in-flight cap; counted here, since the engine's stats lag a burst."""
        if self._in_flight >= self.max_in_flight:
            raise WorkerOverloadedError(
                f"worker {self.worker_id} has {self._in_flight} requests in flight", 1.0
            )
        if request.arrival_s is None:  # a resumed stream: already accepted
            return
        running = self.engine.stats()["num_requests_running"]
        waited = max(0.0, time.time() - request.arrival_s)
        policy = self.engine.engine.scheduler.policy  # read across threads: plain numbers
        refusal = self.admission.check(
            len(request.prompt_token_ids), running, waited, policy.admission_slack(),
            policy.sequence_cap(),
        )  # fmt: skip
        if refusal is not None:
            raise WorkerOverloadedError(refusal.reason, refusal.retry_after_s)

    async def _generate(self, request: GenerateRequest) -> AsyncIterator[RequestDelta]:
        hashes = request.block_hashes
        payloads = await self._fetch_shared_prefix(request.prompt_token_ids, hashes)
        stream = self.engine.generate(
            request.prompt_token_ids,
            request.sampling,
            request.request_id,
            request.priority,
            payloads,
            hashes,
            self.stream_interval_s,
        )
        try:
            async for delta in stream:
                delta.worker_id = self.worker_id
                yield delta
        except ValueError as error:
            raise RequestRejectedError(str(error)) from None
        finally:
            await stream.aclose()

    async def _fetch_shared_prefix(
        self, token_ids: list[int], hashes: list[int] | None
    ) -> list | None:
        """KV of the prompt's leading blocks (`hashes`, from the router) from the shared
        store, when this worker lacks them and loading is expected to beat recomputing them."""
        transfer = self.engine.engine.transfer
        if self.block_store is None or transfer is None or not hashes:
            return None
        # Read from this thread while the engine thread runs: at worst a stale answer, which
        # only changes what is fetched; the engine verifies every payload it loads.
        missing = hashes[transfer.num_cached_leading(token_ids, hashes) :]
        if not missing:
            return None
        per_token = self.engine.stats().get("batching_step_seconds_per_token", 1e-3)
        num_bytes = len(missing) * self.block_bytes
        block_size = self.engine.engine.config.block_size
        if not self.load_cost.should_load(num_bytes, len(missing) * block_size, per_token):
            return None
        started = time.perf_counter()
        found = await self.block_store.get_many(missing)
        payloads = [p for p in found if p is not None]
        if payloads:
            got = sum(len(p.data) for p in payloads)
            self.load_cost.observe(got, time.perf_counter() - started)
        return payloads or None

    def routing_stats(self) -> dict:
        stats = self.engine.stats()
        return {
            "num_running": stats["num_requests_running"],
            "num_waiting": stats["num_requests_waiting"],
            "kv_usage": stats["kv_cache_usage"],
            "first_tokens": [list(pair) for pair in self._first_tokens],
        }

    def stats(self) -> dict:
        device = str(self.engine.engine.device)
        stats = {"worker_id": self.worker_id, "worker_name": self.worker_name, "device": device,
                 "node_id": self.node_id}  # fmt: skip
        stats.update(self.engine.stats())
        stats["num_requests_shed"] = self.admission.num_refused
        if self.block_store is not None:
            stats["kv_store_corrupt"] = self.block_store.num_corrupt
        return stats

    def check_health(self) -> None:
        if not self.engine.alive:
            raise RuntimeError("the engine loop has stopped")

    async def close(self) -> None:
        self._publisher.cancel()
        with contextlib.suppress(Exception):
            await self.index.remove_worker(self.worker_id)
            await self.reports.remove_worker(self.worker_id)
        self.engine.shutdown()


class WorkerDeployment:
    """The Serve replica around a `Worker`: the router streams `generate` from it."""

    async def __init__(
        self,
        engine_config: EngineConfig,
        namespace: str,
        redis_url: str | None = None,
        index_ttl_s: float = 15.0,
        **options,  # Worker's publish_interval_s, max_in_flight, stream_interval_s, slo_*_s
    ) -> None:
        index: PrefixIndex = (
            make_index(redis_url, namespace, index_ttl_s)
            if redis_url
            else ActorPrefixIndex(namespace, index_ttl_s)
        )
        # Reports go through Ray, not Redis: /metrics keeps every worker during a Redis outage.
        reports = ActorWorkerReports(namespace, index_ttl_s)
        context = serve.get_replica_context()
        self.worker = Worker(
            engine_config, context.replica_id.unique_id, index, reports, namespace, redis_url,
            worker_name=replica_name(context), **options,
        )  # fmt: skip

    async def generate(self, request: GenerateRequest) -> AsyncIterator[RequestDelta]:
        async for delta in self.worker.generate(request):
            yield delta

    def record_routing_stats(self) -> dict:
        return self.worker.routing_stats()

    async def stats(self) -> dict:
        return self.worker.stats()

    def check_health(self) -> None:
        self.worker.check_health()

    async def __del__(self) -> None:
        await self.worker.close()


def replica_name(context) -> str:
    """`<node ip>/worker-<rank>`: readable, and kept by the replica that replaces a dead one
    (Serve gives it the free rank), unlike the replica's random id."""
    rank = getattr(context, "rank", None)
    index = getattr(rank, "rank", None)
    suffix = f"worker-{index}" if index is not None else context.replica_id.unique_id
    return f"{ray.util.get_node_ip_address()}/{suffix}"


def record_spans(tracer, request: GenerateRequest, delta: RequestDelta, worker: str) -> None:
    """The worker's spans of a finished request, below the router's `generate` span: the
    request on this worker, and its queue, prefill and decode phases, timed by the scheduler
    (so they are laid out backwards from now)."""
    end = time.time_ns()
    decode_start = end - round(delta.decode_s * 1e9)
    prefill_start = decode_start - round(delta.prefill_s * 1e9)
    queue_start = prefill_start - round(delta.queue_s * 1e9)
    parent = extract(request.trace_context)
    root = tracer.start_span("worker request", context=parent, start_time=queue_start)
    root.set_attribute("manta.worker", worker)
    root.set_attribute("manta.finish_reason", delta.finish_reason or "stop")
    context = set_span_in_context(root)
    num_prompt = len(request.prompt_token_ids)
    phases = [
        ("queue", queue_start, prefill_start, {}),
        ("prefill", prefill_start, decode_start, {
            "manta.prompt_tokens": num_prompt,
            "manta.tokens_computed": num_prompt - delta.num_cached_tokens,
            "manta.tokens_from_cache": delta.num_cached_tokens,
            "manta.tokens_from_store": delta.num_loaded_tokens,
        }),
        ("decode", decode_start, end, {
            "manta.output_tokens": delta.num_output_tokens,
            "manta.spec.proposed": delta.num_spec_proposed,
            "manta.spec.accepted": delta.num_spec_accepted,
        }),
    ]  # fmt: skip
    for name, start, stop, attributes in phases:
        span = tracer.start_span(name, context=context, start_time=start, attributes=attributes)
        span.end(end_time=stop)
    root.end(end_time=end)
