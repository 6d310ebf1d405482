"""Reading tool calls out of generated text: the Hermes, Llama 3.1 and Mistral formats and the
forced ones, fed whole or in pieces of every size; a stream's deltas join to exactly the calls
of the unstreamed response."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest

from kvstore.messages import RequestDelta
from router.protocol import ChatCompletionRequest
from router.responses import ChatFormatter
from router.tool_calls import ToolCallScanner, default_parser

HERMES = (
    'Checking.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa}ris", '
    '"days": [1, {"x": "\\"{"}]}}\n</tool_call>\n<tool_call>\n{"name": "now", "arguments": {}}'
    "\n</tool_call>"
)
LLAMA = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}; {"name": "now", "parameters": {}}'  # noqa: E501
MISTRAL = (
    'Sure [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Rome"}}, '
    '{"arguments": {"tz": "UTC"}, "name": "now"}]'
)
REQUIRED = '[{"name": "get_weather", "parameters": {"city": "Lima"}}]'
EXPECTED = {
    "hermes": ("Checking.", [("get_weather", '{"city": "Pa}ris", "days": [1, {"x": "\\"{"}]}'),
                             ("now", "{}")]),
    "llama3_json": ("", [("get_weather", '{"city": "Oslo"}'), ("now", "{}")]),
    "mistral": ("Sure ", [("get_weather", '{"city": "Rome"}'), ("now", '{"tz": "UTC"}')]),
    "required": ("", [("get_weather", '{"city": "Lima"}')]),
}  # fmt: skip
TEXTS = {"hermes": HERMES, "llama3_json": LLAMA, "mistral": MISTRAL, "required": REQUIRED}


def scan(fmt: str, text: str, step: int, name: str | None = None):
    """Content and calls (name, arguments) as the stream's pieces assemble them."""
    scanner = ToolCallScanner(fmt, name)
    content, calls = "", {}
    for start in range(0, len(text), step):
        more, pieces = scanner.feed(text[start : start + step])
        content += more
        for piece in pieces:
            if piece.id is not None:
                assert piece.index not in calls and piece.name  # id and name come first, once
                calls[piece.index] = [piece.name, ""]
            calls[piece.index][1] += piece.arguments
    content += scanner.finish()
    assembled = [tuple(call) for call in calls.values()]
    assert assembled == [(c.name, c.arguments) for c in scanner.calls]
    return content, assembled


@pytest.mark.parametrize("fmt", list(TEXTS))
@pytest.mark.parametrize("step", [1, 2, 3, 5, 8, 1000])
def test_every_format_reads_the_same_in_pieces_of_any_size(fmt: str, step: int) -> None:
    content, calls = scan(fmt, TEXTS[fmt], step)
    assert (content, calls) == EXPECTED[fmt]
    for _, arguments in calls:
        json.loads(arguments)  # the model's own text, which parses


def test_arguments_stream_before_the_call_closes() -> None:
    scanner = ToolCallScanner("hermes")
    _, pieces = scanner.feed('<tool_call>{"name": "f", "arguments": {"a": "lo')
    assert [(p.name, p.arguments) for p in pieces] == [("f", ""), (None, '{"a": "lo')]
    _, pieces = scanner.feed('ng"}}</tool_call>')
    assert [p.arguments for p in pieces] == ['ng"}']
    assert scanner.calls[0].arguments == '{"a": "long"}'


def test_text_that_only_looks_like_a_marker_is_content() -> None:
    assert scan("hermes", "a <tool b <tool_cal", 1) == ("a <tool b <tool_cal", [])
    assert scan("mistral", "[TOOL] x", 2) == ("[TOOL] x", [])
    assert scan("llama3_json", "The answer is {x}", 1) == ("The answer is {x}", [])
    assert scan("llama3_json", "  <|python", 3) == ("  <|python", [])


def test_text_that_is_not_json_never_raises() -> None:
    text = '<tool_call>{"name": "f\\q", "arguments": tru}</tool_call><tool_call>{"name": 3}'
    for step in (1, 4, 100):
        assert scan("hermes", text, step) == ("", [("f\\q", "tru")])


def test_arguments_written_as_a_string_are_decoded() -> None:
    text = '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>'
    assert scan("hermes", text, 4) == ("", [("f", '{"a": 1}')])


def test_a_named_choice_is_all_arguments() -> None:
    assert scan("named", '{"city": "Oslo"}', 3, name="get_weather") == (
        "", [("get_weather", '{"city": "Oslo"}')])  # fmt: skip


def test_the_default_parser_follows_the_chat_template() -> None:
    assert default_parser("{{ '[TOOL_CALLS]' }}") == "mistral"
    assert default_parser("<|start_header_id|>ipython<|end_header_id|>") == "llama3_json"
    assert default_parser("<tool_call>") == "hermes" and default_parser("") == "hermes"
    with pytest.raises(ValueError, match="unknown tool call parser"):
        ToolCallScanner("xml")


TOOLS = [{"type": "function", "function": {"name": n}} for n in ("get_weather", "now")]


def formatter(parser: str) -> ChatFormatter:
    body = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": TOOLS}
    )
    tokenizer = SimpleNamespace(decode=lambda ids, skip_special_tokens=False: "")
    frontend = SimpleNamespace(tokenizer=tokenizer, model_name="m", tool_call_parser=parser)
    return ChatFormatter(body, frontend, [[1, 2]], body.to_sampling_kwargs())


@pytest.mark.parametrize("fmt", ["hermes", "llama3_json", "mistral"])
def test_streamed_chunks_join_to_the_unstreamed_message(fmt: str) -> None:
    text = TEXTS[fmt]
    whole, streamed = formatter(fmt), formatter(fmt)
    chunks = []
    for start in range(0, len(text), 4):
        piece = text[start : start + 4]
        last = start + 4 >= len(text)
        delta = RequestDelta("r", [0], piece, last, "stop" if last else None, None, 2, 1 + start)
        whole.add(0, delta)
        chunks += [json.loads(c) for c in streamed.chunks(0, delta)]
    message = whole.response()["choices"][0]
    assert message["finish_reason"] == chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    content, calls = "", {}
    for chunk in chunks:
        delta = chunk["choices"][0]["delta"]
        content += delta.get("content") or ""
        for call in delta.get("tool_calls", []):
            if "id" in call:
                assert call["type"] == "function" and call["function"]["arguments"] == ""
                calls[call["index"]] = {"id": call["id"], "name": call["function"]["name"],
                                        "arguments": ""}  # fmt: skip
            else:
                assert set(call) == {"index", "function"}
                calls[call["index"]]["arguments"] += call["function"]["arguments"]
    got = [
        (c["function"]["name"], c["function"]["arguments"])
        for c in message["message"]["tool_calls"]
    ]  # noqa: E501
    assert got == [(c["name"], c["arguments"]) for c in calls.values()] == EXPECTED[fmt][1]
    assert (message["message"]["content"] or "") == content == EXPECTED[fmt][0]


def test_a_reply_without_calls_is_plain_content() -> None:
    out = formatter("hermes")
    out.add(0, RequestDelta("r", [0], "just words", True, "stop", None, 2, 3))
    choice = out.response()["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["message"] == {"role": "assistant", "content": "just words"}


@pytest.mark.parametrize("fmt", ["hermes", "llama3_json", "mistral", "required", "named"])
def test_random_text_never_raises_and_reads_the_same_in_pieces(fmt: str) -> None:
    """What a random-weight model may write: any mix of JSON's characters and the markers."""
    rng = random.Random(fmt)
    atoms = ['{', '}', '[', ']', '"', ':', ',', '\\', ' ', 'a', '1', '"name"', '"arguments"',
             '"parameters"', '<tool_call>', '</tool_call>', '[TOOL_CALLS]', '<|python_tag|>',
             ';', 'tru', '\\u12']  # fmt: skip
    for _ in range(300):
        text = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 40)))
        whole = scan(fmt, text, max(1, len(text)), name="f")
        assert scan(fmt, text, rng.randint(1, 5), name="f") == whole
