"""Penalties, logit_bias and min_tokens end to end: through the offline engine (with and
without speculation, which steered requests skip) and over HTTP with the `openai` client."""

from __future__ import annotations

import openai
import pytest

from router.api import ServerState, create_app
from tests.http_server import Server, engine_frontend, wait_pool_whole
from workers import LLM, SamplingParams
from workers.async_engine import AsyncEngine
from workers.engine import EngineConfig

PROMPTS = ["the cat sat on the", "one two three four", "a b a b a b a b"]


@pytest.fixture(scope="module")
def llm(tiny_model) -> LLM:
    return LLM(tiny_model, num_blocks=128)


def texts(llm: LLM, **params) -> list[str]:
    sampling = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, **params)
    return [o.outputs[0].text for o in llm.generate(PROMPTS, sampling)]


def test_penalties_change_greedy_output_and_speculation_skips_steered_requests(llm, tiny_model):
    plain = texts(llm)
    penalized = texts(llm, frequency_penalty=2.0, presence_penalty=1.0)
    repeated = texts(llm, repetition_penalty=2.0)
    assert penalized != plain and repeated != plain
    spec = LLM(
        tiny_model, num_blocks=128,
        speculative={"method": "ngram", "num_speculative_tokens": 3},
    )  # fmt: skip
    assert texts(spec, frequency_penalty=2.0, presence_penalty=1.0) == penalized
    assert texts(spec) == plain


def test_logit_bias_forces_a_token_and_min_tokens_holds_back_eos(llm):
    token = llm.tokenizer.encode(" cat")[-1]
    sampling = SamplingParams(max_tokens=6, temperature=0.0, logit_bias={token: 100.0})
    out = llm.generate(["hello"], sampling)[0].outputs[0]
    assert out.token_ids == [token] * 6
    (eos,) = sorted(llm.tokenizer.eos_token_ids)[:1]
    eager = SamplingParams(max_tokens=20, temperature=0.0, logit_bias={eos: 100.0})
    assert llm.generate(["hello"], eager)[0].outputs[0].token_ids == [eos]
    held = SamplingParams(max_tokens=20, temperature=0.0, logit_bias={eos: 100.0}, min_tokens=5)
    out = llm.generate(["hello"], held)[0].outputs[0]
    assert len(out.token_ids) == 6 and out.token_ids[-1] == eos
    assert eos not in out.token_ids[:5] and out.finish_reason == "stop"


@pytest.fixture(scope="module")
def server(tiny_model):
    engine = AsyncEngine(EngineConfig(model=tiny_model, num_blocks=128, max_num_seqs=4))
    served = Server(create_app(ServerState(engine_frontend(engine))))
    yield served, engine
    wait_pool_whole(engine)  # every request above, refused ones too, gives its blocks back
    served.stop()
    engine.shutdown()


def test_the_openai_client_sets_them_and_bad_values_get_400(server):
    served, engine = server
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0)
    token = engine.tokenizer.encode(" dog")[-1]
    out = client.completions.create(
        model="tiny", prompt="hello", max_tokens=4, temperature=0,
        logit_bias={str(token): 100}, frequency_penalty=0.5, presence_penalty=0.5,
    )  # fmt: skip
    assert out.usage.completion_tokens == 4
    assert out.choices[0].text == engine.tokenizer.decode([token] * 4)  # forced by the bias
    chat = client.chat.completions.create(
        model="tiny", max_completion_tokens=3, temperature=0,
        messages=[{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}],
        extra_body={"repetition_penalty": 1.3, "min_tokens": 2},
    )  # fmt: skip
    assert chat.usage.completion_tokens >= 2
    for bad in (
        {"logit_bias": {str(10**7): 1}}, {"presence_penalty": 3},
        {"extra_body": {"min_tokens": -1}}, {"extra_body": {"min_tokens": 3}},  # > max_tokens
    ):  # fmt: skip
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="tiny", prompt="hi", max_tokens=2, **bad)


def test_the_server_cap_bounds_the_default_and_refuses_more(server):
    served, engine = server
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0)
    frontend = served.server.config.app.state.manta.frontend
    messages = [{"role": "user", "content": "Hi"}]
    frontend.max_tokens_cap = 5
    try:
        out = client.chat.completions.create(
            model="tiny", messages=messages, temperature=0, extra_body={"ignore_eos": True}
        )
        assert out.usage.completion_tokens == 5 and out.choices[0].finish_reason == "length"
        with pytest.raises(openai.BadRequestError, match="at most 5"):
            client.chat.completions.create(model="tiny", messages=messages, max_tokens=6)
    finally:
        frontend.max_tokens_cap = None
    uncapped = client.chat.completions.create(
        model="tiny", messages=messages, temperature=0, extra_body={"ignore_eos": True}
    )
    assert uncapped.usage.completion_tokens > 5  # what the context leaves
