"""Serve autoscaling of the workers on CPU: a burst of streams scales 1 -> 2 workers, quiet
brings it back to 1, no request is lost on the way, and `/status` (the router's view, from
the workers' reports) follows the replica count."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from ray import serve

from benchmarks.chaos import wait_pool_whole
from benchmarks.common import sse_lines
from cluster.app import WORKER_DEPLOYMENT, build_app
from cluster.config import ClusterConfig
from kvstore.index_actor import kill_index_actor

APP = "manta-autoscaling"


@pytest.fixture(scope="module")
def scaling(ray_cluster, tiny_model):
    name = "tiny-autoscaling"
    config = ClusterConfig(
        model=tiny_model,
        served_model_name=name,
        num_workers=1,
        num_cpus_per_worker=0.5,
        publish_interval_s=0.1,
        slo_ttft_s=None,  # every request of the burst is served, none shed
        engine=dict(num_blocks=256, max_num_seqs=16),
        autoscaling=dict(
            min_replicas=1,
            max_replicas=2,
            target_ongoing_requests=2,
            upscale_delay_s=0.5,
            downscale_delay_s=2.0,
            metrics_interval_s=0.5,
            look_back_period_s=1.0,
        ),  # fmt: skip
    )
    serve.run(build_app(config), name=APP, route_prefix="/scaling")
    yield f"http://127.0.0.1:{ray_cluster}/scaling", name
    serve.delete(APP)
    kill_index_actor(name)


def replicas_running() -> int:
    deployment = serve.status().applications[APP].deployments[WORKER_DEPLOYMENT]
    return deployment.replica_states.get("RUNNING", 0)


async def stream(client: httpx.AsyncClient, model: str, i: int) -> int:
    """One greedy stream; the completion tokens its usage reports."""
    body = {"model": model, "prompt": [1 + i % 50, 2, 3], "max_tokens": 64, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}  # fmt: skip
    tokens = 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in sse_lines(response):
            if line.startswith("data: {"):
                chunk = json.loads(line.removeprefix("data: "))
                assert "error" not in chunk, chunk
                tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
    return tokens


def status_workers(base_url: str) -> int:
    return len(httpx.get(base_url + "/status", timeout=10).json()["workers"])


def test_a_burst_scales_workers_up_and_quiet_scales_them_down(scaling):
    base_url, model = scaling
    assert replicas_running() == 1

    async def burst() -> tuple[list[int], int]:
        seen = 1
        async with httpx.AsyncClient(base_url=base_url, timeout=120, trust_env=False) as client:
            results: list[int] = []
            deadline = time.monotonic() + 90
            i = 0
            while time.monotonic() < deadline:  # waves of 8 streams until a second worker runs
                results += await asyncio.gather(*(stream(client, model, i + k) for k in range(8)))
                i += 8
                seen = max(seen, replicas_running())
                if seen == 2 and status_workers(base_url) == 2:
                    results += await asyncio.gather(*(stream(client, model, k) for k in range(8)))
                    break
            return results, seen

    results, seen = asyncio.run(burst())
    assert seen == 2, "the burst did not add a worker"
    assert results and all(tokens == 64 for tokens in results)  # no request lost or cut

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if replicas_running() == 1 and status_workers(base_url) == 1:
            break
        time.sleep(0.5)
    assert replicas_running() == 1, "quiet did not remove the second worker"
    assert status_workers(base_url) == 1  # the router's view follows
    with httpx.Client(base_url=base_url, timeout=60, trust_env=False) as client:
        body = {"model": model, "prompt": [4, 5, 6], "max_tokens": 4}
        assert client.post("/v1/completions", json=body).status_code == 200
    whole, _ = wait_pool_whole(base_url)
    assert whole, "the worker left holds KV blocks or requests"
