"""Prefix-aware scoring alone: cached overlap against load, and sticky homes for cold tenants."""

from __future__ import annotations

from kvstore.messages import RoutingHint
from router.prefix_router import RoutingWeights, WorkerLoad, rank, rendezvous_home, score_workers

WORKERS = ["w-a", "w-b", "w-c", "w-d"]
W = RoutingWeights()


def hint(matched: dict[str, int], key: int = 7) -> RoutingHint:
    return RoutingHint(matched_blocks=matched, affinity_key=key, block_size=16)


def test_the_worker_holding_the_prefix_wins_unless_it_is_swamped():
    matched = hint({"w-b": 16})  # 256 cached tokens on w-b
    loads = {"w-b": WorkerLoad(in_flight=3), "w-a": WorkerLoad(in_flight=0)}
    assert rank(score_workers(WORKERS, matched, loads, W))[0] == "w-b"
    swamped = {"w-b": WorkerLoad(in_flight=12)}
    assert rank(score_workers(WORKERS, matched, swamped, W))[0] != "w-b"


def test_longer_overlap_beats_shorter():
    scores = score_workers(WORKERS, hint({"w-a": 2, "w-c": 10}), {}, W)
    assert rank(scores)[:2] == ["w-c", "w-a"]


def test_load_counts_the_larger_of_routed_and_reported():
    assert WorkerLoad(in_flight=2, reported=5.0).requests == 5.0
    assert WorkerLoad(in_flight=7, reported=1.0).requests == 7.0
    busy_kv = {"w-a": WorkerLoad(kv_usage=0.9)}
    assert rank(score_workers(WORKERS, None, busy_kv, W))[-1] == "w-a"


def test_cold_prefixes_go_home_and_homes_are_stable():
    homes = {key: rank(score_workers(WORKERS, hint({}, key), {}, W))[0] for key in range(200)}
    assert all(homes[key] == rendezvous_home(key, WORKERS) for key in homes)
    assert len(set(homes.values())) == 4  # tenants spread over every worker
    # Removing a worker moves only the tenants that lived there.
    survivors = [w for w in WORKERS if w != "w-c"]
    moved = [k for k in homes if rendezvous_home(k, survivors) != homes[k]]
    assert moved and all(homes[k] == "w-c" for k in moved)
    # A warm prefix elsewhere outweighs the home bonus.
    warm = score_workers(WORKERS, hint({"w-d": 8}, key=3), {}, W)
    assert rank(warm)[0] == "w-d"


def test_ties_break_by_worker_id():
    assert rank({"w-b": 1.0, "w-a": 1.0, "w-c": 2.0}) == ["w-c", "w-a", "w-b"]
