"""OpenAI protocol models: validation, sampling mapping, and response shapes."""

from __future__ import annotations

import json
from typing import Any

import openai
import openai.types as oai
import openai.types.chat as oai_chat
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from kvstore.sampling_params import SamplingParams
from router.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ModelCard,
    ModelList,
    TokenLogprob,
    TopLogprob,
    Usage,
    error_body,
    validation_error_body,
)

USER = [{"role": "user", "content": "hi"}]


def completion(**fields: Any) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "m", "prompt": "hello", **fields})


def chat(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": USER, **fields})


def errors_of(build: Any, **fields: Any) -> list[dict[str, Any]]:
    with pytest.raises(ValidationError) as info:
        build(**fields)
    return info.value.errors()


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("hello", ["hello"]),
        (["a", "b"], ["a", "b"]),
        ([1, 2, 3], [[1, 2, 3]]),
        ([[1, 2], [3]], [[1, 2], [3]]),
    ],
)
def test_completion_prompts(prompt: Any, expected: list[Any]) -> None:
    assert completion(prompt=prompt).prompts() == expected


def test_steering_parameters_reach_the_sampling_settings() -> None:
    kwargs = completion(
        presence_penalty=0.5, frequency_penalty=-1.0, repetition_penalty=1.2,
        logit_bias={"50": -100, "7": 2.5}, min_tokens=3,
    ).to_sampling_kwargs()  # fmt: skip
    assert kwargs["presence_penalty"] == 0.5 and kwargs["frequency_penalty"] == -1.0
    assert kwargs["repetition_penalty"] == 1.2 and kwargs["min_tokens"] == 3
    assert kwargs["logit_bias"] == {50: -100.0, 7: 2.5}
    plain = completion().to_sampling_kwargs()
    assert plain["logit_bias"] is None and plain["repetition_penalty"] == 1.0
    developer = chat(messages=[{"role": "developer", "content": "be brief"}])
    assert developer.messages[0].role == "developer"
    assert chat(max_tokens=9, max_completion_tokens=5).to_sampling_kwargs()["max_tokens"] == 5


def test_full_requests_parse() -> None:
    request = completion(
        max_tokens=8, temperature=0, top_p=0.9, n=2, stop=["\n"], seed=1, stream=True,
        stream_options={"include_usage": True}, logprobs=2, echo=False, presence_penalty=0,
        frequency_penalty=0.0, user="u", top_k=5, min_p=0.1, ignore_eos=True, priority=-1,
        best_of=1, suffix=None, logit_bias={},
    )  # fmt: skip
    assert request.include_usage and request.priority == -1
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None},
        {"role": "tool", "content": "42", "tool_call_id": "call-1"},
    ]
    request = chat(
        messages=messages, max_completion_tokens=4, logprobs=True, top_logprobs=3, stop="x",
        temperature=None, tool_choice="none", tools=[], response_format={"type": "text"},
    )  # fmt: skip
    assert [message.text() for message in request.messages] == ["be brief", "a\nb", "", "42"]
    assert not request.include_usage


INVALID_COMPLETION = [
    ("model", ""),
    ("prompt", []),
    ("prompt", ""),
    ("prompt", [[1], []]),
    ("prompt", [-1, 2]),
    ("prompt", [1, "a"]),
    ("max_tokens", 0),
    ("temperature", 2.5),
    ("temperature", -0.1),
    ("temperature", "0.5"),
    ("top_p", 0),
    ("top_p", 1.01),
    ("n", 0),
    ("n", 17),
    ("n", True),
    ("stop", ["a", "b", "c", "d", "e"]),
    ("stop", ""),
    ("stop", ["ok", ""]),
    ("seed", 1.5),
    ("stream", "yes"),
    ("stream_options", {"include_usage": True}),
    ("logprobs", 6),
    ("logprobs", -1),
    ("echo", True),
    ("best_of", 3),
    ("suffix", "tail"),
    ("logit_bias", {"word": 1.0}),
    ("logit_bias", {"12": 101.0}),
    ("presence_penalty", 2.5),
    ("frequency_penalty", -2.1),
    ("repetition_penalty", 0.0),
    ("min_tokens", -1),
    ("top_k", -2),
    ("min_p", 1.5),
    ("ignore_eos", "no"),
    ("priority", 0.5),
]


@pytest.mark.parametrize("field, value", INVALID_COMPLETION)
def test_invalid_completion_field_is_named(field: str, value: Any) -> None:
    errors = errors_of(completion, **{field: value})
    assert {error["loc"][0] for error in errors} == {field}
    assert validation_error_body(errors)["error"]["param"] == field


INVALID_CHAT = [
    ("messages", []),
    ("messages", [{"role": "robot", "content": "x"}]),
    ("messages", [{"role": "user"}]),
    ("messages", [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
    ("max_tokens", 0),
    ("max_completion_tokens", 0),
    ("logprobs", 1),
    ("top_logprobs", 21),
    ("top_logprobs", 2),
    ("tools", [{"type": "function", "function": {"name": "no spaces allowed"}}]),
    ("tools", [{"type": "retrieval", "function": {"name": "f"}}]),
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": "object"}}]),
    ("tool_choice", "sometimes"),
    ("response_format", {"type": "xml"}),
    ("response_format", {"type": "json_schema", "json_schema": "not an object"}),
]


TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}},
         {"type": "function", "function": {"name": "g"}}]  # fmt: skip


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"tool_choice": "required"}, "tool_choice needs tools"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "h"}}},
         "'h', which is not in tools"),
        ({"tools": TOOLS + TOOLS[:1]}, "distinct function names"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
         "cannot be combined"),
    ],
)  # fmt: skip
def test_inconsistent_tools_are_refused(fields: dict, message: str) -> None:
    errors = errors_of(chat, **fields)
    assert message in errors[0]["msg"]


def test_tool_choice_modes_and_forced_schemas() -> None:
    assert chat().tool_mode == "none" and chat(tools=TOOLS, tool_choice="none").tool_mode == "none"
    assert chat(tools=TOOLS).tool_mode == "auto"
    assert chat(tools=TOOLS).template_tools() == TOOLS
    assert chat(tools=TOOLS, tool_choice="none").template_tools() is None
    named = chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "g"}})
    assert named.tool_mode == "named"
    assert named.structured_output() == ("json", json.dumps({"type": "object"}))
    required = chat(tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    kind, spec = required.structured_output()
    schema = json.loads(spec)
    assert kind == "json" and schema["maxItems"] == 1 and schema["minItems"] == 1
    names = [c["properties"]["name"]["enum"] for c in schema["items"]["anyOf"]]
    assert names == [["f"], ["g"]]


def test_history_with_tool_calls_renders_for_templates() -> None:
    call = {"id": "c1", "type": "function",
            "function": {"name": "f", "arguments": '{"a": 1}'}}  # fmt: skip
    request = chat(messages=[
        {"role": "developer", "content": "sys"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "2", "tool_call_id": "c1"},
    ])  # fmt: skip
    rendered = [m.for_template() for m in request.messages]
    assert rendered[0] == {"role": "system", "content": "sys"}
    assert rendered[2]["tool_calls"][0]["function"] == {"name": "f", "arguments": {"a": 1}}
    assert rendered[3] == {"role": "tool", "content": "2", "tool_call_id": "c1"}
    with pytest.raises(ValidationError, match="only assistant messages"):
        chat(messages=[{"role": "user", "content": "x", "tool_calls": [call]}])


@pytest.mark.parametrize("field, value", INVALID_CHAT)
def test_invalid_chat_field_is_named(field: str, value: Any) -> None:
    errors = errors_of(chat, **{field: value})
    assert {error["loc"][0] for error in errors} == {field}


@pytest.mark.parametrize("field, value", [("echo", True), ("best_of", 2)])
def test_unsupported_parameter_message_names_it(field: str, value: Any) -> None:
    body = validation_error_body(errors_of(completion, **{field: value}))
    assert field in body["error"]["message"] and "not supported" in body["error"]["message"]


@pytest.mark.parametrize(
    "build, fields, path",
    [
        (completion, {"frobnicate": 1}, "frobnicate"),
        (chat, {"functions": []}, "functions"),
        (chat, {"messages": [{"role": "user", "content": "x", "mood": "ok"}]}, "messages.0.mood"),
        (chat, {"stream": True, "stream_options": {"include_usage": 1, "x": 1}}, None),
    ],
)
def test_unknown_fields_are_rejected(build: Any, fields: dict[str, Any], path: str | None) -> None:
    errors = errors_of(build, **fields)
    if path is not None:
        assert validation_error_body(errors) == error_body(
            f"Unrecognized request argument supplied: {path}",
            "invalid_request_error",
            param=path.split(".")[0],
        )
    assert any(error["type"] == "extra_forbidden" for error in errors)


def test_fastapi_style_errors_are_translated() -> None:
    missing = [{"type": "missing", "loc": ("body", "model"), "msg": "Field required"}]
    assert validation_error_body(missing)["error"] == {
        "message": "Missing required parameter: 'model'.",
        "type": "invalid_request_error",
        "param": "model",
        "code": None,
    }
    image = errors_of(chat, messages=[{"role": "user", "content": [{"type": "image_url"}]}])
    assert "messages.0.content.0.type" in validation_error_body(image)["error"]["message"]


def test_completion_sampling_defaults() -> None:
    kwargs = completion().to_sampling_kwargs()
    assert kwargs == {
        "n": 1, "max_tokens": 16, "temperature": 1.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0,
        "seed": None, "stop": None, "ignore_eos": False, "logprobs": None, "cache_salt": None,
        "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0,
        "logit_bias": None, "min_tokens": 0, "structured_output": None,
    }  # fmt: skip
    assert SamplingParams(**kwargs).max_tokens == 16


def test_completion_sampling_mapping() -> None:
    request = completion(
        max_tokens=7, temperature=0, top_p=0.5, n=3, stop="END", seed=9, logprobs=0, top_k=0,
        min_p=0.2, ignore_eos=True,
    )  # fmt: skip
    params = SamplingParams(**request.to_sampling_kwargs())
    assert (params.max_tokens, params.n, params.seed, params.logprobs) == (7, 3, 9, 0)
    assert params.greedy and params.top_p == 0.5 and params.top_k == -1 and params.min_p == 0.2
    assert params.stop == ["END"] and params.ignore_eos


def test_chat_sampling_mapping() -> None:
    assert chat().to_sampling_kwargs()["max_tokens"] is None
    assert chat(max_tokens=5).to_sampling_kwargs()["max_tokens"] == 5
    assert chat(max_tokens=5, max_completion_tokens=3).to_sampling_kwargs()["max_tokens"] == 3
    assert chat(logprobs=False).to_sampling_kwargs()["logprobs"] is None
    assert chat(logprobs=True).to_sampling_kwargs()["logprobs"] == 0
    kwargs = chat(logprobs=True, top_logprobs=4, stop=["a", "b"]).to_sampling_kwargs()
    params = SamplingParams(**{**kwargs, "max_tokens": 100})
    assert params.logprobs == 4 and params.stop == ["a", "b"]


@given(
    temperature=st.floats(0, 2),
    top_p=st.floats(0, 1, exclude_min=True),
    n=st.integers(1, 16),
    top_k=st.integers(-1, 1000),
    min_p=st.floats(0, 1),
    max_tokens=st.integers(1, 1 << 20),
    logprobs=st.none() | st.integers(0, 5),
)
def test_every_valid_request_builds_sampling_params(**fields: Any) -> None:
    SamplingParams(**completion(**fields).to_sampling_kwargs())


def assert_known_keys(data: Any, parsed: Any) -> None:
    """Every key we emit is a field of the openai client's type, at every depth."""
    if isinstance(parsed, BaseModel):
        assert set(data) <= set(type(parsed).model_fields), set(data) - set(
            type(parsed).model_fields
        )
        for key, value in data.items():
            assert_known_keys(value, getattr(parsed, key))
    elif isinstance(parsed, list):
        for item, parsed_item in zip(data, parsed, strict=True):
            assert_known_keys(item, parsed_item)


def roundtrip(response: BaseModel, openai_type: type[openai.BaseModel]) -> dict[str, Any]:
    data = json.loads(response.model_dump_json())
    parsed = openai_type.model_validate(data)
    assert_known_keys(data, parsed)
    assert parsed.to_dict(mode="json", exclude_unset=True) == data
    return data


def test_completion_response_shape() -> None:
    logprobs = CompletionLogprobs(
        tokens=["Hi", "!"],
        token_logprobs=[-0.1, -0.5],
        top_logprobs=[{"Hi": -0.1}, {"!": -0.5}],
        text_offset=[0, 2],
    )
    response = CompletionResponse(
        model="m",
        choices=[CompletionChoice(index=0, text="Hi!", logprobs=logprobs, finish_reason="length")],
        usage=Usage.of(prompt_tokens=10, completion_tokens=2, cached_tokens=8),
    )
    data = roundtrip(response, oai.Completion)
    assert data["id"].startswith("cmpl-") and data["object"] == "text_completion"
    assert data["usage"] == {
        "prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12,
        "prompt_tokens_details": {"cached_tokens": 8},
    }  # fmt: skip


def test_completion_stream_chunk_shape() -> None:
    chunk = CompletionResponse(id="cmpl-1", created=5, model="m", choices=[])
    chunk.choices.append(CompletionChoice(index=1, text="He"))
    assert json.loads(chunk.model_dump_json()) == {
        "id": "cmpl-1", "object": "text_completion", "created": 5, "model": "m",
        "choices": [{"index": 1, "text": "He", "logprobs": None, "finish_reason": None}],
        "usage": None,
    }  # fmt: skip


def test_chat_response_shape() -> None:
    token = TokenLogprob(
        token="Hi",
        logprob=-0.2,
        bytes=[72, 105],
        top_logprobs=[TopLogprob(token="Hi", logprob=-0.2)],
    )
    response = ChatCompletionResponse(
        model="m",
        choices=[
            ChatChoice(
                index=0,
                message=AssistantMessage(content="Hi"),
                logprobs=ChatLogprobs(content=[token]),
                finish_reason="stop",
            )
        ],
        usage=Usage.of(3, 1),
    )
    data = roundtrip(response, oai_chat.ChatCompletion)
    assert data["id"].startswith("chatcmpl-") and data["object"] == "chat.completion"
    assert data["choices"][0]["message"] == {"role": "assistant", "content": "Hi"}


def test_chat_stream_chunk_shapes() -> None:
    def chunk(delta: DeltaMessage | None, finish: Any = None, usage: Usage | None = None) -> Any:
        choices = (
            [] if delta is None else [ChatChunkChoice(index=0, delta=delta, finish_reason=finish)]
        )
        response = ChatCompletionChunk(id="chatcmpl-1", created=7, model="m", choices=choices)
        response.usage = usage
        return roundtrip(response, oai_chat.ChatCompletionChunk)

    first = chunk(DeltaMessage(role="assistant", content=""))
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunk(DeltaMessage(content="Hi"))["choices"][0]["delta"] == {"content": "Hi"}
    last = chunk(DeltaMessage(), finish="length")
    assert last["choices"][0] == {
        "index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"
    }  # fmt: skip
    usage = chunk(None, usage=Usage.of(3, 2))
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 5
    assert {first["id"], last["id"], usage["id"]} == {"chatcmpl-1"}


def test_models_and_error_shapes() -> None:
    listing = json.loads(ModelList(data=[ModelCard(id="tiny", created=1)]).model_dump_json())
    assert listing == {
        "object": "list",
        "data": [{"id": "tiny", "object": "model", "created": 1, "owned_by": "manta"}],
    }
    oai.Model.model_validate(listing["data"][0])
    assert error_body("no such model", "not_found_error", "model", "model_not_found") == {
        "error": {
            "message": "no such model",
            "type": "not_found_error",
            "param": "model",
            "code": "model_not_found",
        }
    }
