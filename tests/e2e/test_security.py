"""A cluster with API keys, two tenants, Redis and a KV-store secret, through the `openai`
client: keys are required, tenants never see each other's cache, and KV payloads forged in
Redis are refused (counted) while every answer stays what a clean run gives."""

from __future__ import annotations

import re
import time

import httpx
import openai
import pytest
import ray
import redis as redis_client
from ray import serve

from benchmarks.redis_server import RedisServer
from cluster.app import build_app
from cluster.config import ClusterConfig
from kvstore.index_actor import kill_index_actor
from workers import LLM, SamplingParams

NAME = "tiny-secure"
KEYS = ["e2e-key-alpha:alpha", "e2e-key-beta0:beta"]
SYSTEM = (
    "You answer for the claims office of an insurance company. Quote the clause you rely on, "
    "keep to two sentences, and ask for the policy number whenever it is missing."
)


@pytest.fixture(scope="module")
def cluster(ray_cluster, tiny_model):
    redis = RedisServer()
    redis.start()
    config = ClusterConfig(
        model=tiny_model,
        served_model_name=NAME,
        num_workers=2,
        num_cpus_per_worker=0.5,
        redis_url=redis.url,
        api_keys=KEYS,
        publish_interval_s=0.1,
        engine=dict(num_blocks=96, max_num_seqs=8, kv_store_secret="e2e-secure-cluster-secret"),
    )
    serve.run(build_app(config), name="secure", route_prefix="/")
    yield f"http://127.0.0.1:{ray_cluster}", redis
    serve.delete("secure")
    kill_index_actor(NAME)
    redis.stop()


def client(base_url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key=key, max_retries=0, timeout=60)


def ask(base_url: str, key: str, question: str):
    return client(base_url, key).chat.completions.create(
        model=NAME,
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
        max_tokens=6,
        temperature=0,
    )


def per_worker(base_url: str, name: str) -> dict[str, float]:
    text = httpx.get(base_url + "/metrics").text
    pattern = rf'^{name}{{[^}}]*replica="([^"]+)"[^}}]*}} ([0-9.e+-]+)$'
    return {w: float(v) for w, v in re.findall(pattern, text, flags=re.M)}


def metric_sum(base_url: str, name: str) -> float:
    return sum(per_worker(base_url, name).values())


def test_keys_are_required(cluster):
    base_url, _ = cluster
    with pytest.raises(openai.AuthenticationError):
        client(base_url, "e2e-key-wrong").completions.create(model=NAME, prompt="hi", max_tokens=2)
    assert httpx.get(base_url + "/v1/models").status_code == 401
    assert [m.id for m in client(base_url, "e2e-key-beta0").models.list()] == [NAME]


def test_tenants_do_not_share_cached_prefixes(cluster):
    base_url, _ = cluster
    ask(base_url, "e2e-key-alpha", "First claim.")
    warm = ask(base_url, "e2e-key-alpha", "Second claim.")
    assert warm.usage.prompt_tokens_details.cached_tokens >= 32
    other = ask(base_url, "e2e-key-beta0", "Second claim.")
    assert other.usage.prompt_tokens_details.cached_tokens == 0
    assert other.choices[0].message.content == warm.choices[0].message.content


def test_forged_payloads_in_redis_never_change_an_answer(cluster, tiny_model):
    base_url, redis = cluster
    question = "Where is my refund?"
    before = per_worker(base_url, "manta_prefix_cache_queries_total")
    ask(base_url, "e2e-key-beta0", "A claim.")
    ask(base_url, "e2e-key-beta0", "Another claim.")  # hot: its blocks go to the store
    time.sleep(0.5)
    queries = per_worker(base_url, "manta_prefix_cache_queries_total")
    (holder,) = [w for w in queries if queries[w] > before.get(w, 0)]
    store = redis_client.Redis.from_url(redis.url)
    deadline = time.time() + 5
    while not (keys := store.keys("manta:*:kv:*")) and time.time() < deadline:
        time.sleep(0.1)
    assert keys, "no KV payload was shared"
    for key in keys:  # same length, same header: only the tensor bytes are forged
        header, _, data = store.get(key).partition(b"\n")
        store.set(key, header + b"\n" + bytes(255 - b for b in data))
    # Kill the worker that holds the prompt, so the other one fetches the forged blocks.
    actor = next(a for a in ray.util.list_named_actors(all_namespaces=True) if holder in a["name"])
    ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]))
    answers = [ask(base_url, "e2e-key-beta0", question) for _ in range(3)]
    offline = LLM(tiny_model, num_blocks=96)
    tok = offline.tokenizer
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    ids = tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)
    want = offline.generate(ids, SamplingParams(max_tokens=6, temperature=0))[0].outputs[0].text
    assert all(a.choices[0].message.content == want for a in answers)
    deadline = time.time() + 5
    while metric_sum(base_url, "manta_kv_blocks_rejected_total") < 1 and time.time() < deadline:
        time.sleep(0.1)
    assert metric_sum(base_url, "manta_kv_blocks_rejected_total") >= 1
    assert metric_sum(base_url, "manta_kv_blocks_loaded_total") == 0
