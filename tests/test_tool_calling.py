"""Tool calling through the `openai` client over real HTTP, on a random-weight model: required
and named tool_choice over three tools give calls whose arguments validate against their
schemas, streamed deltas reassemble to the unstreamed call, a full round trip (call, tool
result, answer) works, a bad tool schema gets a 400, and the pool is whole afterwards."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.http_server import served_engine, wait_pool_whole

SCHEMAS = {
    "get_weather": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "pattern": "^[A-Z][a-z]{1,8}$"},
            "unit": {"enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
    "add": {
        "type": "object",
        "properties": {
            "a": {"type": "integer", "minimum": -99, "maximum": 99},
            "b": {"type": "integer", "minimum": -99, "maximum": 99},
        },
        "required": ["a", "b"],
        "additionalProperties": False,
    },
    "search": {
        "type": "object",
        "properties": {
            "query": {"type": "string", "maxLength": 10},
            "tags": {"type": "array", "items": {"enum": ["news", "web"]}, "maxItems": 2},
        },
        "required": ["query", "tags"],
        "additionalProperties": False,
    },
}
TOOLS = [
    {"type": "function", "function": {"name": name, "description": f"{name} tool",
                                      "parameters": schema}}
    for name, schema in SCHEMAS.items()
]  # fmt: skip
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def served(tiny_model):
    with served_engine(tiny_model, num_blocks=256, max_num_seqs=8) as (client, engine):
        yield client, engine


@pytest.fixture(autouse=True)
def pool_whole_after(request):
    """After every test here that served requests, the engine's KV pool is whole again."""
    yield
    if "served" in request.fixturenames:
        wait_pool_whole(request.getfixturevalue("served")[1])


def call(client, stream: bool, messages=ASK, **kwargs):
    """(content, [(id, name, arguments)], finish_reason), streamed deltas joined up."""
    kwargs = {"model": "tiny", "messages": messages, "tools": TOOLS, "max_tokens": 300,
              "temperature": 0, **kwargs}  # fmt: skip
    if not stream:
        choice = client.chat.completions.create(**kwargs).choices[0]
        calls = [(c.id, c.function.name, c.function.arguments)
                 for c in choice.message.tool_calls or []]  # fmt: skip
        return choice.message.content, calls, choice.finish_reason
    content, calls, reason = "", {}, None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for piece in delta.tool_calls or []:
            if piece.id is not None:  # the first piece names the call
                assert piece.index not in calls and piece.function.arguments == ""
                calls[piece.index] = [piece.id, piece.function.name, ""]
            else:
                assert piece.function.name is None
                calls[piece.index][2] += piece.function.arguments
        reason = chunk.choices[0].finish_reason or reason
    return content or None, [tuple(c) for c in calls.values()], reason


def assert_valid(calls) -> None:
    assert calls
    for call_id, name, arguments in calls:
        assert call_id.startswith("call_")
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])


@pytest.mark.parametrize("parallel", [False, True])
def test_required_gives_valid_calls_streamed_or_not(served, parallel):
    client, _ = served
    for seed in range(3):
        kwargs = {"tool_choice": "required", "parallel_tool_calls": parallel, "seed": seed,
                  "temperature": 0.8, "max_tokens": 800}  # fmt: skip
        content, calls, reason = call(client, False, **kwargs)
        assert reason == "tool_calls" and content is None
        assert_valid(calls)
        assert len(calls) <= (8 if parallel else 1)
        streamed = call(client, True, **kwargs)
        assert streamed[2] == "tool_calls"
        assert [c[1:] for c in streamed[1]] == [c[1:] for c in calls]  # same calls, new ids


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_a_named_function_is_called_with_valid_arguments(served, name):
    client, _ = served
    choice = {"type": "function", "function": {"name": name}}
    content, calls, reason = call(client, False, tool_choice=choice)
    assert reason == "tool_calls" and content is None
    assert [c[1] for c in calls] == [name]
    assert_valid(calls)
    assert [c[1:] for c in call(client, True, tool_choice=choice)[1]] == [c[1:] for c in calls]


def test_a_round_trip_call_result_answer(served):
    client, _ = served
    _, calls, _ = call(client, False, tool_choice="required", parallel_tool_calls=False)
    call_id, name, arguments = calls[0]
    history = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call_id, "type": "function",
             "function": {"name": name, "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": call_id, "content": '{"temperature": 21}'},
    ]  # fmt: skip
    for stream in (False, True):
        content, calls, reason = call(client, stream, messages=history, max_tokens=12)
        assert reason in ("stop", "length", "tool_calls")
        assert content or calls  # the model answered something, as text or as calls
    # "none" hides the tools: no calls are read even from text that looks like one.
    content, calls, reason = call(client, False, messages=history, tool_choice="none",
                                  max_tokens=12)  # fmt: skip
    assert calls == [] and reason in ("stop", "length")


def test_bad_tool_schemas_get_400_and_the_engine_stays_whole(served):
    client, engine = served
    bad_schema = [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}
    ]
    bad = [
        {"tools": bad_schema, "tool_choice": "required"},
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        {"tools": [{"type": "function", "function": {"name": "bad name"}}]},
        {"tools": None, "tool_choice": "required"},
    ]  # fmt: skip
    for kwargs in bad:
        kwargs = {"model": "tiny", "messages": ASK, "max_tokens": 8, **kwargs}
        if kwargs["tools"] is None:
            del kwargs["tools"]
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(**kwargs)
    _, calls, _ = call(client, False, tool_choice="required", parallel_tool_calls=False)
    assert_valid(calls)
    wait_pool_whole(engine)
