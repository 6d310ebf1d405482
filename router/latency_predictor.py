"""Each worker's time to first token for a request, predicted by an online regression.

This is the router policy `predicted_latency`, after llm-d's latency-predictor scorer. For a
request and a worker the router knows, at the moment it routes:

- `new_tokens`: the prompt tokens that worker would compute (the prompt less the leading blocks
  the prefix index says it holds);
- `backlog_tokens`, `backlog_requests`: the uncomputed prompt tokens and the requests this
  router sent there that have no first token yet, the queue that request would join;
- `decoding`: the requests there past their first token, which share every step with it;
- `kv_usage`: the worker's KV pool usage, as it last reported it.

TTFT ~ theta . x, fitted by recursive least squares with exponential forgetting (the machine's
speed drifts with its load) on the first-token times the workers report for the requests this
router sent them, joined by request id. The features are the router's own view, stale by up to
a report period, and the fit learns from that same view, so its staleness is part of the model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

FEATURES = ("bias", "new_tokens", "backlog_tokens", "backlog_requests", "decoding", "kv_usage")
TOKEN_SCALE = 1e-3  # tokens in thousands, so every feature is of order one


def features(
    new_tokens: int, backlog_tokens: int, backlog_requests: int, decoding: int, kv_usage: float
) -> np.ndarray:
    return np.array(
        [1.0, new_tokens * TOKEN_SCALE, backlog_tokens * TOKEN_SCALE, backlog_requests,
         decoding, kv_usage],
    )  # fmt: skip


class OnlineRegression:
    """Ridge regression over exponentially weighted samples: the sums X'X and X'y decay by
    `forgetting` per sample, so about 1 / (1 - forgetting) recent samples decide the fit."""

    def __init__(self, num_features: int, forgetting: float = 0.995, ridge: float = 1e-3):
        self.forgetting = forgetting
        self.ridge = ridge * np.eye(num_features)
        self.xtx = np.zeros((num_features, num_features))
        self.xty = np.zeros(num_features)
        self.num_samples = 0
        self._theta: np.ndarray | None = np.zeros(num_features)

    def observe(self, x: np.ndarray, y: float) -> None:
        self.xtx = self.forgetting * self.xtx + np.outer(x, x)
        self.xty = self.forgetting * self.xty + y * x
        self.num_samples += 1
        self._theta = None  # solved again when next needed: samples come in batches

    @property
    def theta(self) -> np.ndarray:
        if self._theta is None:
            self._theta = np.linalg.solve(self.xtx + self.ridge, self.xty)
        return self._theta

    def predict(self, x: np.ndarray) -> float:
        return max(0.0, float(x @ self.theta))


@dataclass(slots=True)
class Routed:
    """A request this router sent to a worker, until the worker reports its first token."""

    worker: str
    x: np.ndarray
    new_tokens: int
    routed_at: float
    completed: bool = False  # the call ended (often before the report of its first token)


@dataclass(slots=True)
class WorkerBacklog:
    tokens: int = 0
    requests: int = 0
    ids: set[str] = field(default_factory=set)


class LatencyPredictor:
    """What the router has sent where and not yet seen start, and the regression fitted on it.
    `min_samples`: the fit is trusted after that many first tokens (before that the router
    falls back to the prefix score). `stale_s`: a request whose first token was never reported
    (refused, aborted, or its report lost) stops counting after that long."""

    def __init__(self, min_samples: int = 32, stale_s: float = 30.0, clock=time.monotonic):
        self.regression = OnlineRegression(len(FEATURES))
        self.min_samples = min_samples
        self.stale_s = stale_s
        self.clock = clock
        self._routed: dict[str, Routed] = {}
        self._backlogs: dict[str, WorkerBacklog] = {}
        # The features of each candidate worker, by request id, from the prediction until the
        # request is routed; and the request id by the call's id, until the call completes.
        self._candidates: dict[str, dict[str, tuple[np.ndarray, int]]] = {}
        self._calls: dict[str, str] = {}

    def predict_workers(
        self, request_id: str, workers: dict[str, tuple[int, int, float]]
    ) -> dict[str, float]:
        """Each worker's predicted TTFT for a request, from its (new tokens, requests in
        flight, KV usage). Made, and remembered for learning, before the fit is trusted."""
        if len(self._candidates) > 4096:  # predictions never routed (cancelled requests)
            self._candidates.clear()
        candidates, predicted = {}, {}
        for worker, (new_tokens, in_flight, kv_usage) in workers.items():
            x = self.features(worker, new_tokens, in_flight, kv_usage)
            candidates[worker] = (x, new_tokens)
            predicted[worker] = self.predict(x)
        self._candidates[request_id] = candidates
        return predicted

    def chose(self, request_id: str, worker: str, call_id: str) -> None:
        """The request went to `worker` as call `call_id`: it joins that worker's backlog."""
        candidates = self._candidates.pop(request_id, None)
        if candidates is None or worker not in candidates:
            return
        x, new_tokens = candidates[worker]
        self.routed(request_id, worker, x, new_tokens)
        if len(self._calls) > 4096:  # completions never seen: bounded anyway
            self._calls.clear()
        self._calls[call_id] = request_id

    def call_completed(self, call_id: str) -> None:
        request_id = self._calls.pop(call_id, None)
        if request_id is not None:
            self.completed(request_id)

    @property
    def ready(self) -> bool:
        return self.regression.num_samples >= self.min_samples

    def features(self, worker: str, new_tokens: int, in_flight: int, kv_usage: float):
        backlog = self._backlogs.get(worker) or WorkerBacklog()
        decoding = max(0, in_flight - backlog.requests)
        return features(new_tokens, backlog.tokens, backlog.requests, decoding, kv_usage)

    def predict(self, x: np.ndarray) -> float:
        return self.regression.predict(x)

    def predict_idle(self, new_tokens: int) -> float:
        """The TTFT of a request computing `new_tokens` on a worker with nothing else to do."""
        return self.predict(features(new_tokens, 0, 0, 0, 0.0))

    def routed(self, request_id: str, worker: str, x: np.ndarray, new_tokens: int) -> None:
        self._expire()
        if request_id in self._routed:  # a repeated id: keep the first, never count twice
            return
        self._routed[request_id] = Routed(worker, x, new_tokens, self.clock())
        backlog = self._backlogs.setdefault(worker, WorkerBacklog())
        backlog.tokens += new_tokens
        backlog.requests += 1
        backlog.ids.add(request_id)

    def completed(self, request_id: str) -> None:
        """The call ended; its first token may still be reported (and learned from)."""
        routed = self._routed.get(request_id)
        if routed is not None and not routed.completed:
            routed.completed = True
            self._leave_backlog(request_id, routed)

    def first_tokens(self, reports: list) -> None:
        """A worker's `[request id, seconds to its first token]` pairs: learn from those this
        router sent; the rest (another router's, or already seen) are skipped."""
        for item in reports:
            try:
                request_id, seconds = str(item[0]), float(item[1])
            except (TypeError, ValueError, IndexError):
                continue
            routed = self._routed.pop(request_id, None)
            if routed is None or not np.isfinite(seconds) or seconds < 0:
                continue
            if not routed.completed:
                self._leave_backlog(request_id, routed)
            self.regression.observe(routed.x, seconds)

    def forget_worker(self, worker: str) -> None:
        self._backlogs.pop(worker, None)
        for request_id in [r for r, v in self._routed.items() if v.worker == worker]:
            del self._routed[request_id]

    def _leave_backlog(self, request_id: str, routed: Routed) -> None:
        backlog = self._backlogs.get(routed.worker)
        if backlog is not None and request_id in backlog.ids:
            backlog.ids.discard(request_id)
            backlog.tokens -= routed.new_tokens
            backlog.requests -= 1

    def _expire(self) -> None:
        deadline = self.clock() - self.stale_s
        while self._routed:  # insertion order is routing order: the oldest come first
            request_id, routed = next(iter(self._routed.items()))
            if routed.routed_at > deadline:
                break
            del self._routed[request_id]
            self._leave_backlog(request_id, routed)
