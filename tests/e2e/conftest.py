"""A real Ray cluster, a real Redis server and the real Serve application, for end-to-end tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import ray
from ray import serve

from benchmarks.redis_server import RedisServer, free_port
from cluster.app import build_app
from cluster.config import ClusterConfig
from kvstore.index_actor import kill_index_actor

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@dataclass
class Served:
    base_url: str
    model_name: str
    model_dir: str
    index: str
    redis: RedisServer | None


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[int]:
    """Ray and Serve, started once; yields the HTTP port."""
    ray.init(include_dashboard=False, num_cpus=4, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module", params=["embedded", "redis"])
def served(request, ray_cluster, tiny_model) -> Iterator[Served]:
    """The app on two workers, with the embedded index or with a Redis index."""
    redis = None
    if request.param == "redis":
        redis = RedisServer()
        redis.start()
    name = f"tiny-{request.param}"
    config = ClusterConfig(
        model=tiny_model,
        served_model_name=name,
        num_workers=2,
        num_cpus_per_worker=0.5,
        redis_url=redis.url if redis else None,
        max_ongoing_requests=6,
        max_queued_requests=6,
        publish_interval_s=0.1,
        engine=dict(
            num_blocks=96,
            max_num_seqs=8,
            max_num_batched_tokens=256,
            # Served text must equal the offline engine's, which runs without speculation.
            # A fixed k: whether "auto" speculates depends on step timings, which a shared
            # machine makes noisy (the auto policy is tested on its own).
            speculative={"method": "ngram", "num_speculative_tokens": 2},
            kv_store_secret="e2e-cluster-secret-0123",  # KV sharing through Redis needs it
        ),
    )
    serve.run(build_app(config), name="manta", route_prefix="/")
    yield Served(f"http://127.0.0.1:{ray_cluster}", name, tiny_model, request.param, redis)
    serve.delete("manta")
    kill_index_actor(name)
    if redis is not None:
        redis.stop()
