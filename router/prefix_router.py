"""Prefix-aware choice of a worker: cached overlap against load.

score(worker) = hit_weight x prompt tokens the worker already holds (from the prefix index)
              - load_weight x requests on it (what this router has in flight, or what the
                worker last reported, whichever is larger)
              - kv_pressure_weight x its KV pool usage
              + affinity_bonus on the tenant's home worker when no worker holds the prefix yet
The home is chosen by rendezvous hashing of the prompt's head over the live worker ids, so a
tenant sticks to one worker across requests and only moves when that worker goes away.

The `predicted_latency` policy ranks by each worker's predicted time to first token instead
(router/latency_predictor.py); among the workers within `latency_slack_s` of the fastest it
keeps the one holding most of the prompt (then the tenant's home), so caches stay warm while
no request waits much longer than it must. Until its regression has seen enough first tokens
it ranks by the score above.

`score_workers` is pure and tested alone; `PrefixAwareRequestRouter` plugs it into Ray Serve.
"""

from __future__ import annotations

import itertools
import logging
from collections import defaultdict
from dataclasses import dataclass

import xxhash
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from kvstore.messages import GenerateRequest, RoutingHint
from router.latency_predictor import LatencyPredictor
from router.tracing import note_routing

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class RoutingWeights:
    hit_weight: float = 1.0
    load_weight: float = 32.0
    kv_pressure_weight: float = 32.0
    affinity_bonus: float = 96.0


@dataclass(slots=True)
class WorkerLoad:
    in_flight: int = 0  # routed by this router and not yet completed
    reported: float = 0.0  # running + waiting, as the worker last reported
    kv_usage: float = 0.0

    @property
    def requests(self) -> float:
        return max(float(self.in_flight), self.reported)


def rendezvous_home(key: int, worker_ids: list[str]) -> str:
    """The worker with the highest hash of (key, worker): stable as workers come and go."""
    return max(worker_ids, key=lambda w: xxhash.xxh3_64_intdigest(f"{key}:{w}".encode()))


def score_workers(
    worker_ids: list[str],
    hint: RoutingHint | None,
    loads: dict[str, WorkerLoad],
    weights: RoutingWeights,
) -> dict[str, float]:
    scores = {}
    matched = hint.matched_blocks if hint is not None else {}
    cold = not any(matched.get(w, 0) for w in worker_ids)
    home = rendezvous_home(hint.affinity_key, worker_ids) if hint is not None and cold else None
    for worker in worker_ids:
        load = loads.get(worker) or WorkerLoad()
        score = -weights.load_weight * load.requests - weights.kv_pressure_weight * load.kv_usage
        if hint is not None:
            score += weights.hit_weight * matched.get(worker, 0) * hint.block_size
        if worker == home:
            score += weights.affinity_bonus
        scores[worker] = score
    return scores


def rank(scores: dict[str, float]) -> list[str]:
    """Best first; ties broken by worker id so the choice is deterministic."""
    return sorted(scores, key=lambda w: (-scores[w], w))


def rank_by_latency(
    predicted: dict[str, float],
    hint: RoutingHint | None,
    slack_s: float,
    slo_s: float | None = None,
    alone_s: float = 0.0,
) -> list[str]:
    """Fastest first, but among those within `slack_s` of the fastest: most cached blocks,
    then the tenant's home (when no worker holds the prompt), then the faster.

    When no worker is predicted to meet `slo_s`, though the request would meet it on an idle
    worker (`alone_s`: its predicted TTFT with no queue), it is late only because of the
    queues. It then goes to the slowest worker, where it delays only requests that are late
    already, instead of pushing a worker that still meets the SLO past it (which would make
    every request there late, and so on through the cluster in a surge)."""
    workers = list(predicted)
    best = min(predicted.values())
    if slo_s is not None and best > slo_s >= alone_s:
        return sorted(workers, key=lambda w: (-predicted[w], w))
    matched = hint.matched_blocks if hint is not None else {}
    cold = not any(matched.get(w, 0) for w in workers)
    home = rendezvous_home(hint.affinity_key, workers) if hint is not None and cold else None

    def key(worker: str):
        near = predicted[worker] <= best + slack_s
        if not near:
            return (1, 0, 0, predicted[worker], worker)
        return (0, -matched.get(worker, 0), worker != home, predicted[worker], worker)

    return sorted(workers, key=key)


class PrefixAwareRequestRouter(RequestRouter):
    """Ray Serve request router over worker replicas; never raises (a raise hangs a request)."""

    def initialize_state(
        self,
        policy: str = "prefix",
        latency_slack_s: float = 0.05,
        slo_ttft_s: float | None = None,
        **weights: float,
    ) -> None:
        self.policy = policy
        self.weights = RoutingWeights(**weights)
        self.latency_slack_s = latency_slack_s
        self.slo_ttft_s = slo_ttft_s
        self.predictor = LatencyPredictor()
        self._predicting = False  # the fit has been trusted once (and that was logged)
        self._in_flight: defaultdict[str, int] = defaultdict(int)
        self._round_robin = itertools.count()

    @property
    def max_num_routing_tasks(self) -> int:
        # The default (2 x replicas) lets long streams pinned to one worker block routing for
        # requests bound elsewhere.
        return 64

    def _loads(self, replicas: list[RunningReplica]) -> dict[str, WorkerLoad]:
        loads = {}
        for replica in replicas:
            worker = replica.replica_id.unique_id
            stats = replica.routing_stats or {}
            loads[worker] = WorkerLoad(
                in_flight=self._in_flight.get(worker, 0),
                reported=float(stats.get("num_running", 0) + stats.get("num_waiting", 0)),
                kv_usage=float(stats.get("kv_usage", 0.0)),
            )
        return loads

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        try:
            if pending_request is not None:
                # Without this a full replica is re-probed in a tight loop.
                pending_request.routing_context.should_backoff = True
            return self._choose(candidate_replicas, pending_request)
        except Exception:
            logger.exception("prefix routing failed; falling back to any replica")
            return [candidate_replicas]

    def _choose(
        self, replicas: list[RunningReplica], pending_request: PendingRequest | None
    ) -> list[list[RunningReplica]]:
        if len(replicas) <= 1:
            return [replicas]
        by_id = {r.replica_id.unique_id: r for r in replicas}
        if self.policy == "round_robin":
            ids = sorted(by_id)
            start = next(self._round_robin) % len(ids)
            return [[by_id[w]] for w in ids[start:] + ids[:start]]
        request = _generate_request(pending_request) if pending_request is not None else None
        hint = request.routing if request is not None else None
        if self.policy not in ("prefix", "predicted_latency"):
            hint = None
        loads = self._loads(replicas)
        if self.policy == "predicted_latency":
            for replica in replicas:
                reports = (replica.routing_stats or {}).get("first_tokens") or []
                self.predictor.first_tokens(reports)
            if request is not None:
                predicted, alone = self._predict(request, loads)  # learned from before use
                if self.predictor.ready:
                    self._log_once()
                    ranked = rank_by_latency(
                        predicted, hint, self.latency_slack_s, self.slo_ttft_s, alone
                    )
                    note_routing(request, "predicted_ttft_s", predicted)
                    return [[by_id[w]] for w in ranked]
        scores = score_workers(list(by_id), hint, loads, self.weights)
        if request is not None:
            note_routing(request, "score", scores)
        return [[by_id[w]] for w in rank(scores)]

    def _log_once(self) -> None:
        if not self._predicting:
            self._predicting = True
            theta = ", ".join(f"{v:.3g}" for v in self.predictor.regression.theta)
            logger.info("predicted-latency routing on: TTFT fit [%s]", theta)

    def _predict(self, request: GenerateRequest, loads: dict[str, WorkerLoad]):
        """Each worker's predicted TTFT, and the request's on an idle worker holding as much
        of its prompt as the best of them."""
        hint = request.routing
        matched = hint.matched_blocks if hint is not None else {}
        block_size = hint.block_size if hint is not None else 0
        num_prompt = len(request.prompt_token_ids)
        workers = {
            worker: (
                max(0, num_prompt - matched.get(worker, 0) * block_size),
                load.in_flight,
                load.kv_usage,
            )
            for worker, load in loads.items()
        }
        alone = self.predictor.predict_idle(min(new for new, _, _ in workers.values()))
        return self.predictor.predict_workers(request.request_id, workers), alone

    def on_request_routed(self, pending_request, replica_id: ReplicaID, result) -> None:
        worker = replica_id.unique_id
        self._in_flight[worker] += 1
        if self.policy == "predicted_latency":
            request = _generate_request(pending_request)
            if request is not None:
                call_id = pending_request.metadata.internal_request_id
                self.predictor.chose(request.request_id, worker, call_id)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        worker = replica_id.unique_id
        if self._in_flight.get(worker, 0) > 0:
            self._in_flight[worker] -= 1
        self.predictor.call_completed(internal_request_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._in_flight.pop(replica_id.unique_id, None)
        self.predictor.forget_worker(replica_id.unique_id)


def _generate_request(pending_request: PendingRequest) -> GenerateRequest | None:
    for arg in list(pending_request.args) + list(pending_request.kwargs.values()):
        if isinstance(arg, GenerateRequest):
            return arg
    return None
