"""The predicted-latency router policy alone: the online regression recovers a TTFT law from
reported first tokens, the backlog it keeps counts each routed request once, and the ranking
keeps a warm cache when it costs little time and leaves it when it costs much."""

from __future__ import annotations

import numpy as np
import pytest

from kvstore.messages import RoutingHint
from router.latency_predictor import FEATURES, LatencyPredictor, OnlineRegression, features
from router.prefix_router import rank_by_latency, rendezvous_home


def ttft_law(x: np.ndarray) -> float:
    """A worker's true TTFT: a fixed cost, prefill of its own and the queue's tokens, and the
    running decodes it shares steps with."""
    return float(x @ np.array([0.02, 0.6, 0.9, 0.004, 0.003, 0.05]))


def test_the_regression_recovers_a_linear_law():
    rng = np.random.default_rng(0)
    fit = OnlineRegression(len(FEATURES))
    for _ in range(400):
        x = features(*rng.integers(0, 800, 2), *rng.integers(0, 8, 2), rng.uniform())
        fit.observe(x, ttft_law(x))
    probe = features(300, 500, 3, 4, 0.5)
    assert fit.predict(probe) == pytest.approx(ttft_law(probe), rel=0.02)


def test_forgetting_follows_a_machine_that_slows_down():
    rng = np.random.default_rng(1)
    fit = OnlineRegression(len(FEATURES), forgetting=0.98)
    for slowdown in (1.0, 3.0):  # the machine gets busy: every cost triples
        for _ in range(400):
            x = features(*rng.integers(0, 800, 2), *rng.integers(0, 8, 2), rng.uniform())
            fit.observe(x, slowdown * ttft_law(x))
    probe = features(300, 500, 3, 4, 0.5)
    assert fit.predict(probe) == pytest.approx(3.0 * ttft_law(probe), rel=0.05)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_backlog_counts_each_routed_request_once():
    clock = Clock()
    predictor = LatencyPredictor(min_samples=2, stale_s=10.0, clock=clock)
    x = predictor.features("w", 100, in_flight=0, kv_usage=0.0)
    predictor.routed("a", "w", x, 100)
    predictor.routed("b", "w", x, 200)
    predictor.routed("b", "w", x, 200)  # the same id again is not a second request
    queued = predictor.features("w", 0, in_flight=2, kv_usage=0.0)
    assert queued[FEATURES.index("backlog_tokens")] == pytest.approx(0.3)
    assert queued[FEATURES.index("backlog_requests")] == 2
    assert queued[FEATURES.index("decoding")] == 0
    # "a" starts (its first token is reported); "b" ends before its report arrives.
    predictor.first_tokens([["a", 0.05], ["someone-else", 0.2], "garbage"])
    predictor.completed("b")
    predictor.completed("b")
    after = predictor.features("w", 0, in_flight=1, kv_usage=0.0)
    assert after[FEATURES.index("backlog_tokens")] == 0
    assert after[FEATURES.index("backlog_requests")] == 0
    assert after[FEATURES.index("decoding")] == 1
    assert not predictor.ready  # one sample so far: "b" is still to be reported
    predictor.first_tokens([["b", 0.07], ["a", 0.05]])  # "a" again is not learned twice
    assert predictor.ready and predictor.regression.num_samples == 2


def test_a_request_never_reported_stops_counting():
    clock = Clock()
    predictor = LatencyPredictor(stale_s=10.0, clock=clock)
    predictor.routed("lost", "w", predictor.features("w", 50, 0, 0.0), 50)
    clock.now = 11.0
    predictor.routed("next", "w", predictor.features("w", 10, 1, 0.0), 10)
    x = predictor.features("w", 0, in_flight=1, kv_usage=0.0)
    assert x[FEATURES.index("backlog_tokens")] == pytest.approx(0.01)
    predictor.forget_worker("w")
    assert predictor.features("w", 0, 0, 0.0)[FEATURES.index("backlog_requests")] == 0


def hint(matched: dict[str, int], key: int = 3) -> RoutingHint:
    return RoutingHint(matched_blocks=matched, affinity_key=key, block_size=16)


def test_a_warm_cache_wins_when_it_costs_little_time():
    predicted = {"w-a": 0.10, "w-b": 0.12, "w-c": 0.30}
    assert rank_by_latency(predicted, hint({"w-b": 16}), slack_s=0.05)[0] == "w-b"
    assert rank_by_latency(predicted, hint({"w-c": 16}), slack_s=0.05)[0] == "w-a"
    assert rank_by_latency(predicted, hint({"w-c": 16}), slack_s=0.05)[-1] == "w-c"


def test_cold_prompts_go_home_among_the_fast():
    workers = ["w-a", "w-b", "w-c"]
    for key in range(20):
        home = rendezvous_home(key, workers)
        near = {w: 0.1 for w in workers}
        assert rank_by_latency(near, hint({}, key), slack_s=0.05)[0] == home
        far = {w: (0.5 if w == home else 0.1) for w in workers}
        assert rank_by_latency(far, hint({}, key), slack_s=0.05)[0] != home


def test_a_request_late_only_for_the_queues_goes_where_requests_are_late_already():
    """Past the SLO everywhere, it joins the slowest worker rather than tip the one still
    within it; past the SLO even alone (too long a prompt), it takes the fastest as ever."""
    predicted = {"w-a": 1.4, "w-b": 3.0, "w-c": 1.1}
    queued = rank_by_latency(predicted, hint({}), slack_s=0.05, slo_s=1.0, alone_s=0.3)
    assert queued == ["w-b", "w-a", "w-c"]
    too_long = rank_by_latency(predicted, hint({}), slack_s=0.05, slo_s=1.0, alone_s=1.05)
    assert too_long[0] == "w-c"
    within = {"w-a": 0.9, "w-b": 3.0}
    assert rank_by_latency(within, hint({}), slack_s=0.05, slo_s=1.0, alone_s=0.3)[0] == "w-a"
    assert rank_by_latency(predicted, hint({}), slack_s=0.05, slo_s=None)[0] == "w-c"


def test_the_whole_cycle_learns_before_it_is_trusted():
    """Predictions are made and remembered from the first request, so first tokens reported
    for requests routed by the fallback score teach the fit that later takes over; a worker
    with a queue then predicts slower than an idle one."""
    predictor = LatencyPredictor(min_samples=8)
    rng = np.random.default_rng(2)
    for i in range(40):
        request_id, call_id = f"r{i}", f"c{i}"
        new_tokens = int(rng.integers(16, 400))
        busy = int(rng.integers(0, 6))
        predictor.predict_workers(request_id, {"w-a": (new_tokens, busy, 0.1)})
        predictor.chose(request_id, "w-a", call_id)
        x = predictor.features("w-a", new_tokens, busy, 0.1)
        predictor.first_tokens([[request_id, ttft_law(x)]])
        predictor.call_completed(call_id)
    assert predictor.ready and predictor.regression.num_samples == 40
    predicted = predictor.predict_workers("next", {"w-a": (200, 6, 0.1), "w-b": (200, 0, 0.1)})
    assert predicted["w-b"] < predicted["w-a"]
    assert predictor.predict_idle(200) == pytest.approx(predicted["w-b"], abs=0.05)
    assert predictor.features("w-a", 0, 0, 0.0)[FEATURES.index("backlog_requests")] == 0
