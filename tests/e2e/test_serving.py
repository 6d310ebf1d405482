"""The served cluster through the official `openai` client and raw HTTP: same text as the
offline engine, prefix-aware routing, OpenAI-style errors, overload, disconnects, failures."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time

import httpx
import openai
import pytest
import ray
from ray import serve

from workers import LLM, SamplingParams

SYSTEM = (
    "You are a careful assistant for the accounting team of a large company. Answer briefly, "
    "cite the policy section you rely on, and never invent numbers that are not in the question."
)


@pytest.fixture(scope="module")
def client(served) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=served.base_url + "/v1", api_key="unused", max_retries=0, timeout=60
    )


@pytest.fixture(scope="module")
def offline(tiny_model) -> LLM:
    return LLM(tiny_model, num_blocks=96)


def worker_metric(served, name: str) -> dict[str, float]:
    text = httpx.get(served.base_url + "/metrics").text
    pattern = rf'^{name}{{[^}}]*replica="([^"]+)"[^}}]*}} ([0-9.e+-]+)$'
    return {w: float(v) for w, v in re.findall(pattern, text, flags=re.M)}


def wait_pools_whole(served, timeout_s: float = 10.0) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        usage = worker_metric(served, "manta_kv_cache_usage_ratio")
        running = worker_metric(served, "manta_num_requests_running")
        if len(usage) == 2 and not any(usage.values()) and not any(running.values()):
            return
        time.sleep(0.1)
    raise AssertionError(f"KV pools not whole: usage {usage}, running {running}")


def wait_workers_running(count: int = 2, timeout_s: float = 60.0) -> None:
    """Until the controller reports `count` worker replicas running (after a kill)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        states = serve.status().applications["manta"].deployments["MantaWorker"].replica_states
        if states.get("RUNNING", 0) >= count and len(states) == 1:
            return
        time.sleep(0.5)
    raise AssertionError(f"workers not back: {states}")


def test_completion_text_equals_offline_engine(served, client, offline):
    prompt = "The history of the printing press"
    got = client.completions.create(
        model=served.model_name, prompt=prompt, max_tokens=24, temperature=0
    )
    want = offline.generate(prompt, SamplingParams(max_tokens=24, temperature=0))[0]
    assert got.choices[0].text == want.outputs[0].text
    assert got.choices[0].finish_reason == want.outputs[0].finish_reason
    assert got.usage.prompt_tokens == len(want.prompt_token_ids)
    assert got.usage.completion_tokens == len(want.outputs[0].token_ids)


def test_chat_stream_equals_non_stream_and_offline(served, client, offline):
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi 👋"}]
    whole = client.chat.completions.create(
        model=served.model_name, messages=messages, max_tokens=20, temperature=0
    )
    chunks = list(
        client.chat.completions.create(
            model=served.model_name,
            messages=messages,
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    tok = offline.tokenizer
    ids = tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)
    want = offline.generate(ids, SamplingParams(max_tokens=20, temperature=0))[0].outputs[0]
    assert whole.choices[0].message.content == want.text


def test_speculation_runs_in_the_workers(served, client):
    client.completions.create(
        model=served.model_name, prompt="7 8 9 7 8 9 7 8 9 7 8", max_tokens=32, temperature=0
    )
    time.sleep(0.3)
    assert sum(worker_metric(served, "manta_spec_decode_proposed_tokens_total").values()) > 0


def test_stop_seeds_n_and_logprobs(served, client):
    name = served.model_name
    base = client.completions.create(model=name, prompt="Once upon", max_tokens=16, temperature=0)
    text = base.choices[0].text
    stop = text[6:9]
    cut = client.completions.create(
        model=name, prompt="Once upon", max_tokens=16, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    sampled = [
        client.completions.create(
            model=name, prompt="Once upon", max_tokens=12, temperature=1.0, seed=seed
        )
        .choices[0]
        .text
        for seed in (7, 7, 8)
    ]
    assert sampled[0] == sampled[1] != sampled[2]
    several = client.completions.create(
        model=name, prompt="Once upon", max_tokens=6, temperature=1.0, n=3, seed=1, logprobs=2
    )
    assert sorted(c.index for c in several.choices) == [0, 1, 2]
    assert all(len(c.logprobs.top_logprobs[0]) <= 2 for c in several.choices)
    assert several.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in several.choices)


def test_shared_system_prompt_lands_where_its_cache_is(served, client):
    system = "Payroll desk. " + SYSTEM  # a prompt no earlier test has sent
    before = worker_metric(served, "manta_prefix_cache_hits_total")
    cached = []
    questions = ["What is VAT?", "Define accrual.", "Who signs invoices?", "When to audit?",
                 "Is rent an expense?", "What is a ledger?"]  # fmt: skip
    for question in questions:
        out = client.chat.completions.create(
            model=served.model_name,
            messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
            max_tokens=4,
            temperature=0,
        )
        cached.append(out.usage.prompt_tokens_details.cached_tokens)
        time.sleep(0.3)  # let the worker publish its new blocks to the index
    assert cached[0] == 0
    # Later requests hit the cache. Serve may route one elsewhere when its queue-length probe
    # of the holder times out on a loaded machine; that request then warms a second copy.
    assert sum(c >= 32 for c in cached[1:]) >= 4, cached
    time.sleep(0.3)
    after = worker_metric(served, "manta_prefix_cache_hits_total")
    gained = sorted(after[w] - before.get(w, 0) for w in after)
    assert gained[-1] >= 0.75 * sum(cached), gained  # the hits concentrate on the holder


@pytest.mark.parametrize(
    "path,body,status,needle",
    [
        ("/v1/completions", "{not json", 400, "parse the JSON"),
        ("/v1/completions", {"model": "M", "prompt": "hi", "bogus": 1}, 400, "bogus"),
        ("/v1/completions", {"model": "M", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
        ("/v1/completions", {"model": "M", "prompt": "hi", "temperature": "hot"}, 400, "temper"),
        ("/v1/completions", {"model": "nope", "prompt": "hi"}, 404, "does not exist"),
        ("/v1/completions", {"model": "M", "prompt": "hi " * 3000}, 400, "context length"),
        ("/v1/chat/completions", {"model": "M", "messages": []}, 400, "messages"),
        ("/v1/completions", {"model": "M", "prompt": [5, 10**7]}, 400, "token ids"),
    ],
)
def test_bad_input_gets_openai_errors(served, path, body, status, needle):
    if isinstance(body, dict):
        body = {**body, "model": served.model_name if body["model"] == "M" else body["model"]}
        response = httpx.post(served.base_url + path, json=body)
    else:
        response = httpx.post(
            served.base_url + path, content=body, headers={"content-type": "application/json"}
        )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert needle in error["message"] or needle == error["param"]


def test_overload_gets_429_with_retry_after_and_disconnects_free_blocks(served):
    body = {"model": served.model_name, "prompt": "a long tale", "max_tokens": 300,
            "temperature": 0, "ignore_eos": True, "stream": True}  # fmt: skip

    async def storm() -> list[int]:
        async with httpx.AsyncClient(base_url=served.base_url, timeout=60) as http:

            async def one() -> int:
                async with http.stream("POST", "/v1/completions", json=body) as response:
                    if response.status_code != 200:
                        assert int(response.headers["retry-after"]) >= 1
                        await response.aread()
                        assert response.json()["error"]["code"] == "overloaded"
                        return response.status_code
                    async for line in response.aiter_lines():
                        if line.startswith("data: {"):
                            break  # hang up after the first chunk: a client disconnect
                    return 200

            return await asyncio.gather(*(one() for _ in range(40)))

    statuses = asyncio.run(storm())
    assert 429 in statuses and 200 in statuses
    wait_pools_whole(served)


def test_second_worker_loads_a_hot_system_prompt_instead_of_recomputing(served, client):
    system = "Travel desk. " + SYSTEM
    ask = lambda q: client.chat.completions.create(  # noqa: E731
        model=served.model_name,
        messages=[{"role": "system", "content": system}, {"role": "user", "content": q}],
        max_tokens=6,
        temperature=0,
    )
    wait_workers_running()
    before = worker_metric(served, "manta_prefix_cache_queries_total")
    ask("Book a flight.")
    ask("Cancel my hotel.")  # the second sighting makes the prompt's blocks hot: exported
    time.sleep(0.5)
    queries = worker_metric(served, "manta_prefix_cache_queries_total")
    (holder,) = [w for w in queries if queries[w] > before.get(w, 0)]
    name = next(
        a for a in ray.util.list_named_actors(all_namespaces=True) if holder in a["name"]
    )  # fmt: skip
    ray.kill(ray.get_actor(name["name"], namespace=name["namespace"]))
    reply = ask("Where is my luggage?")  # lands on a worker that never saw the prompt
    deadline = time.time() + 3  # workers report their counters every publish interval
    while True:
        loaded = worker_metric(served, "manta_kv_blocks_loaded_total")
        if sum(loaded.values()) or served.redis is None or time.time() > deadline:
            break
        time.sleep(0.1)
    if served.redis is None:  # no Redis, no block store: the other worker recomputes
        assert reply.usage.prompt_tokens_details.cached_tokens == 0
        assert not any(loaded.values())
    else:
        assert reply.usage.prompt_tokens_details.cached_tokens >= 32
        assert sum(loaded.values()) >= 2
    expected = ask("Where is my luggage?")  # same worker, now from its own cache
    assert reply.choices[0].message.content == expected.choices[0].message.content


def test_requests_survive_a_dead_worker_and_a_dead_redis(served, client):
    wait_workers_running()
    if served.redis is not None:
        served.redis.stop()  # Redis is an accelerator: routing falls back to load only
    deadline = time.time() + 15  # a worker killed just before may still be listed a while
    while True:
        replicas = [
            a for a in ray.util.list_named_actors(all_namespaces=True)
            if "MantaWorker" in a["name"]
        ]  # fmt: skip
        ids = {a["name"].rsplit("#", 1)[-1] for a in replicas}  # replica ids: `replica` labels
        listed = set(worker_metric(served, "manta_num_requests_running"))
        if len(ids) == 2 and listed == ids:
            break
        assert time.time() < deadline, f"/metrics lists {listed}, replicas are {ids}"
        time.sleep(0.2)
    killed = replicas[0]["name"].rsplit("#", 1)[-1]
    ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]))

    async def burst():
        aclient = openai.AsyncOpenAI(base_url=served.base_url + "/v1", api_key="x", max_retries=0)
        return await asyncio.gather(
            *(
                aclient.completions.create(
                    model=served.model_name, prompt=f"question {i}", max_tokens=8, temperature=0
                )
                for i in range(5)  # within the router queue limit (6): all are accepted
            )
        )

    outs = asyncio.run(burst())
    assert all(o.choices[0].finish_reason == "length" for o in outs)
    # /metrics comes from the workers' own reports through Ray, not Redis: the live worker
    # stays listed while Redis is down, and the dead one leaves within a freshness period.
    deadline = time.time() + 8
    while True:
        now_listed = set(worker_metric(served, "manta_num_requests_running"))
        if killed not in now_listed and listed - {killed} <= now_listed:
            break
        assert time.time() < deadline, f"/metrics lists {now_listed}, was {listed}"
        time.sleep(0.1)
    if served.redis is not None:
        served.redis.start()
    wait_workers_running()


def test_structured_outputs_hold_in_the_served_cluster(served, client):
    import json

    import jsonschema

    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 10},
                       "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
        "required": ["name", "tags"],
        "additionalProperties": False,
    }  # fmt: skip
    fmt = {"type": "json_schema", "json_schema": {"name": "user", "schema": schema, "strict": True}}
    for stream in (False, True):
        kwargs = dict(model=served.model_name, response_format=fmt, max_tokens=200, seed=3,
                      messages=[{"role": "user", "content": "A user."}])  # fmt: skip
        if stream:
            chunks = client.chat.completions.create(stream=True, **kwargs)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        else:
            text = client.chat.completions.create(**kwargs).choices[0].message.content
        jsonschema.validate(json.loads(text), schema)
    choice = client.completions.create(
        model=served.model_name, prompt="Answer:", max_tokens=5,
        extra_body={"guided_choice": ["yes", "no"]},
    )  # fmt: skip
    assert choice.choices[0].text in ("yes", "no")
    wait_pools_whole(served)


def test_tool_calls_hold_in_the_served_cluster(served, client):
    import json

    import jsonschema

    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "pattern": "^[A-Z][a-z]{1,8}$"},
                       "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "days"],
        "additionalProperties": False,
    }  # fmt: skip
    tools = [{"type": "function", "function": {"name": "forecast", "parameters": schema}},
             {"type": "function", "function": {"name": "clock"}}]  # fmt: skip
    kwargs = dict(model=served.model_name, tools=tools, max_tokens=100, seed=5,
                  tool_choice={"type": "function", "function": {"name": "forecast"}},
                  messages=[{"role": "user", "content": "Weather in Oslo?"}])  # fmt: skip
    reply = client.chat.completions.create(**kwargs).choices[0]
    assert reply.finish_reason == "tool_calls" and reply.message.content is None
    (made,) = reply.message.tool_calls
    jsonschema.validate(json.loads(made.function.arguments), schema)
    streamed = ""
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for piece in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
            assert piece.index == 0
            streamed += piece.function.arguments or ""
    assert streamed == made.function.arguments  # the same call, streamed in pieces
    history = [*kwargs.pop("messages"), reply.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": made.id, "content": "rain"}]  # fmt: skip
    kwargs.pop("tool_choice")
    answer = client.chat.completions.create(messages=history, **kwargs).choices[0]
    assert answer.finish_reason in ("stop", "length", "tool_calls")
    wait_pools_whole(served)


def test_worker_labels_are_node_and_rank(served):
    """Readable and stable: `worker` is `<node ip>/worker-<rank>`, one rank a replica."""
    text = httpx.get(served.base_url + "/metrics").text
    pattern = r'^manta_kv_cache_usage_ratio{[^}]*worker="([^"]+)"'
    labels = sorted(set(re.findall(pattern, text, re.M)))
    assert len(labels) == 2
    assert all(re.fullmatch(r"\d+\.\d+\.\d+\.\d+/worker-\d+", label) for label in labels), labels
    assert {label.rsplit("-", 1)[1] for label in labels} == {"0", "1"}


def test_manta_status_lists_workers_and_the_index(served, client):
    client.completions.create(model=served.model_name, prompt="status " * 40, max_tokens=2)
    command = [sys.executable, "-m", "cluster.cli", "status", "--url", served.base_url]
    deadline = time.time() + 10
    while True:  # the index holds the prompt's blocks after the workers' next publish
        answer = json.loads(subprocess.run(
            [*command, "--json"], capture_output=True, text=True, check=True, timeout=60
        ).stdout)  # fmt: skip
        index = answer["prefix_index"]
        if index["entries"] or time.time() > deadline:
            break
        time.sleep(0.2)
    assert index["backend"] == ("redis" if served.redis else "ray-actor")
    assert index["reachable"] is True and index["entries"] > 0
    assert len(answer["workers"]) == 2
    assert all(w["device"] == "cpu" and 0 <= w["kv_usage"] <= 1 for w in answer["workers"])
    table = subprocess.run(command, capture_output=True, text=True, check=True, timeout=60).stdout
    assert "2 worker(s)" in table and "reachable" in table
    assert all(w["worker"] in table for w in answer["workers"])
    wait_pools_whole(served)
