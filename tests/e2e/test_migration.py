"""A worker killed while it streams costs no stream anything: the router continues each of its
requests on the other worker from the prompt plus the tokens already sent, and clients see the
very text an uninterrupted run gives, with usage counted once."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
import ray
from ray import serve

from benchmarks.chaos import recoveries, wait_pool_whole, worker_stats
from cluster.app import build_app
from cluster.config import ClusterConfig
from kvstore.index_actor import kill_index_actor
from workers import LLM, SamplingParams

NAME = "tiny-migrate"
PROMPTS = [f"Story number {i} begins with" for i in range(6)]
MAX_TOKENS = 160


@pytest.fixture(scope="module")
def base_url(ray_cluster, tiny_model):
    config = ClusterConfig(
        model=tiny_model,
        served_model_name=NAME,
        num_workers=2,
        num_cpus_per_worker=0.5,
        publish_interval_s=0.1,
        engine=dict(num_blocks=128, max_num_seqs=8),
    )
    serve.run(build_app(config), name="migrate", route_prefix="/")
    yield f"http://127.0.0.1:{ray_cluster}"
    serve.delete("migrate")
    kill_index_actor(NAME)


def kill_one_worker() -> None:
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if "MantaWorker" in actor["name"] and "migrate" in actor["name"]:
            ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]))
            return
    raise AssertionError("no worker replica found")


def test_streams_and_plain_requests_survive_a_worker_killed_mid_stream(base_url, tiny_model):
    client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0, timeout=120)
    started = asyncio.Event()
    count = {"started": 0}

    async def stream(prompt: str) -> tuple[str, int, str]:
        chunks = await client.completions.create(
            model=NAME, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )  # fmt: skip
        text, usage, reason = [], None, None
        async for chunk in chunks:
            if chunk.choices:
                text.append(chunk.choices[0].text)
                reason = chunk.choices[0].finish_reason or reason
                if len(text) == 1:
                    count["started"] += 1
                    if count["started"] == len(PROMPTS):
                        started.set()
                    await started.wait()  # every stream is under way before the kill
            if chunk.usage:
                usage = chunk.usage.completion_tokens
        return "".join(text), usage, reason

    async def plain(prompt: str) -> str:
        await started.wait()
        out = await client.completions.create(
            model=NAME, prompt=prompt, max_tokens=48, temperature=0,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        return out.choices[0].text

    async def main():
        tasks = [asyncio.create_task(stream(p)) for p in PROMPTS]
        plains = [asyncio.create_task(plain(p)) for p in PROMPTS[:2]]
        await started.wait()
        kill_one_worker()
        return await asyncio.gather(*tasks), await asyncio.gather(*plains)

    streams, plains = asyncio.run(main())
    offline = LLM(tiny_model, num_blocks=128)
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    expected = [o.outputs[0].text for o in offline.generate(PROMPTS, greedy)]
    for (text, usage, reason), want in zip(streams, expected):
        assert text == want  # no token lost, repeated or changed
        assert usage == MAX_TOKENS and reason == "length"
    short = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
    assert plains == [o.outputs[0].text for o in offline.generate(PROMPTS[:2], short)]
    assert recoveries(base_url).get("migration", 0) >= 1  # streams really moved mid-way
    whole, _ = wait_pool_whole(base_url, timeout_s=15)
    assert whole, worker_stats(base_url)


def running_workers() -> int:
    states = serve.status().applications["migrate"].deployments["MantaWorker"].replica_states
    return states.get("RUNNING", 0)


def test_health_says_503_while_no_worker_runs_and_recovers(base_url):
    assert httpx.get(base_url + "/ready").json()["model"] == NAME
    # Both replicas up first: one the controller has not created yet (the replacement of the
    # worker killed before) would escape the kill and keep the app serving.
    deadline = time.time() + 90
    while running_workers() != 2:
        assert time.time() < deadline, "the two workers never ran again"
        time.sleep(0.2)
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if "MantaWorker" in actor["name"] and "migrate" in actor["name"]:
            ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]))

    def wait_for(status: int, timeout_s: float) -> httpx.Response:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            response = httpx.get(base_url + "/health")
            if response.status_code == status:
                return response
            time.sleep(0.2)
        raise AssertionError(f"/health never answered {status}")

    down = wait_for(503, 15)
    assert down.json()["error"]["type"] == "service_unavailable"
    assert httpx.get(base_url + "/ready").status_code in (200, 503)
    wait_for(200, 90)  # Serve restarts the replicas
    assert httpx.get(base_url + "/ready").status_code == 200
