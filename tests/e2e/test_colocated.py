"""A one-worker cluster served as one replica (ingress and engine together) through the real
`openai` client: the same text as the offline engine, streaming, metrics, overload shedding and
disconnects that free every block."""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import openai
import pytest
from ray import serve

from cluster.app import COLOCATED_DEPLOYMENT, build_app
from cluster.config import ClusterConfig
from workers import LLM, SamplingParams

NAME = "tiny-colocated"


@pytest.fixture(scope="module")
def base_url(ray_cluster, tiny_model):
    config = ClusterConfig(
        model=tiny_model,
        served_model_name=NAME,
        num_workers=1,
        num_cpus_per_worker=0.5,
        max_ongoing_requests=4,
        publish_interval_s=0.1,
        engine=dict(num_blocks=96, max_num_seqs=4, max_num_batched_tokens=256),
    )
    serve.run(build_app(config), name="colocated", route_prefix="/")
    yield f"http://127.0.0.1:{ray_cluster}"
    serve.delete("colocated")


def gauges(base_url: str, name: str) -> dict[str, float]:
    text = httpx.get(base_url + "/metrics").text
    pattern = rf'^{name}{{[^}}]*replica="([^"]+)"[^}}]*}} ([0-9.e+-]+)$'
    return {w: float(v) for w, v in re.findall(pattern, text, flags=re.M)}


def test_one_replica_serves_what_the_offline_engine_gives(base_url, tiny_model):
    deployments = serve.status().applications["colocated"].deployments
    assert list(deployments) == [COLOCATED_DEPLOYMENT]
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)
    prompt = "The history of the printing press"
    got = client.completions.create(model=NAME, prompt=prompt, max_tokens=20, temperature=0)
    offline = LLM(tiny_model, num_blocks=96)
    want = offline.generate(prompt, SamplingParams(max_tokens=20, temperature=0))[0]
    assert got.choices[0].text == want.outputs[0].text
    assert got.usage.completion_tokens == len(want.outputs[0].token_ids)
    chunks = client.completions.create(
        model=NAME, prompt=prompt, max_tokens=20, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.outputs[0].text
    # The worker reports its load to the index in this process; /metrics reads it there.
    deadline = time.time() + 10
    while not gauges(base_url, "manta_kv_cache_usage_ratio") and time.time() < deadline:
        time.sleep(0.1)
    assert len(gauges(base_url, "manta_kv_cache_usage_ratio")) == 1


def test_overload_sheds_with_429_and_disconnects_free_every_block(base_url):
    body = {"model": NAME, "prompt": "a long tale", "max_tokens": 300, "temperature": 0,
            "ignore_eos": True, "stream": True}  # fmt: skip

    async def storm() -> list[int]:
        async with httpx.AsyncClient(base_url=base_url, timeout=60) as http:

            async def one() -> int:
                async with http.stream("POST", "/v1/completions", json=body) as response:
                    if response.status_code != 200:
                        await response.aread()
                        assert response.json()["error"]["code"] == "overloaded"
                        assert response.headers.get("retry-after") == "1"
                        return response.status_code
                    async for line in response.aiter_lines():
                        if line.startswith("data: {"):
                            break
                    await asyncio.sleep(1.0)  # keep the slot busy while the rest arrive
                    return 200  # then hang up: a client disconnect

            return await asyncio.gather(*(one() for _ in range(24)))

    statuses = asyncio.run(storm())
    assert 429 in statuses and 200 in statuses
    deadline = time.time() + 10
    while time.time() < deadline:
        usage = gauges(base_url, "manta_kv_cache_usage_ratio")
        running = gauges(base_url, "manta_num_requests_running")
        if usage and not any(usage.values()) and not any(running.values()):
            return
        time.sleep(0.1)
    raise AssertionError(f"KV pool not whole: usage {usage}, running {running}")
