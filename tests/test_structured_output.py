"""Structured outputs through the `openai` client over real HTTP, on a random-weight model:
20 generated JSON schemas (nested objects, arrays with bounds, enums, bounded integers,
patterned strings, anyOf), streamed and not, every output parses and validates; JSON mode,
regex, choice and grammar; bad specs get 400 and leave the engine healthy and its pool whole."""

from __future__ import annotations

import json
import random
import re

import jsonschema
import openai
import pytest

from tests.http_server import served_engine, wait_pool_whole

WORDS = ["red", "green", "blue", "cat", "dog"]


def make_schema(rng: random.Random, depth: int = 0) -> dict:
    """A random schema of the kinds applications send."""
    kinds = ["integer", "enum", "string", "boolean", "array"] + (
        ["object", "anyOf"] if depth < 2 else []
    )
    kind = rng.choice(kinds)
    if kind == "integer":
        low = rng.randint(-50, 50)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 100)}
    if kind == "enum":
        return {"enum": rng.sample(WORDS, rng.randint(1, 4))}
    if kind == "string":
        return rng.choice(
            [{"type": "string", "maxLength": 12}, {"type": "string", "pattern": "^[a-z]{2,6}$"}]
        )
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "array":
        low = rng.randint(0, 2)
        items = make_schema(rng, depth + 1) if depth < 2 else {"type": "integer"}
        return {
            "type": "array",
            "items": items,
            "minItems": low,
            "maxItems": low + rng.randint(0, 2),
        }
    if kind == "anyOf":
        return {"anyOf": [make_schema(rng, depth + 1), make_schema(rng, depth + 1)]}
    names = rng.sample(["id", "name", "tags", "score", "ok", "child"], rng.randint(1, 4))
    return {
        "type": "object",
        "properties": {n: make_schema(rng, depth + 1) for n in names},
        "required": names,
        "additionalProperties": False,
    }


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


def chat(client, stream: bool, **kwargs) -> tuple[str, str]:
    messages = [{"role": "user", "content": "Give me the record."}]
    if not stream:
        out = client.chat.completions.create(model="tiny", messages=messages, **kwargs)
        return out.choices[0].message.content, out.choices[0].finish_reason
    text, reason = [], None
    for chunk in client.chat.completions.create(
        model="tiny", messages=messages, stream=True, **kwargs
    ):
        if chunk.choices:
            text.append(chunk.choices[0].delta.content or "")
            reason = chunk.choices[0].finish_reason or reason
    return "".join(text), reason


def test_twenty_generated_schemas_always_validate(served):
    client, _ = served
    rng = random.Random(7)
    for i in range(20):
        schema = make_schema(rng)
        fmt = {
            "type": "json_schema",
            "json_schema": {"name": f"s{i}", "schema": schema, "strict": True},
        }
        text, reason = chat(client, stream=i % 2 == 1, response_format=fmt, max_tokens=400,
                            temperature=0.9, seed=i)  # fmt: skip
        assert reason == "stop", (schema, text)
        jsonschema.validate(json.loads(text), schema)


def test_json_mode_regex_choice_and_grammar(served):
    client, _ = served
    ended = []  # an unbounded object may run out of tokens; those that end must parse
    for seed in range(4):
        text, reason = chat(
            client, False, response_format={"type": "json_object"}, max_tokens=300, seed=seed
        )
        assert text.startswith("{")
        if reason == "stop":
            ended.append(json.loads(text))
    assert ended and all(isinstance(obj, dict) for obj in ended)
    text, _ = chat(client, True, extra_body={"guided_regex": "[0-9]{3}-[a-z]{2}"}, max_tokens=20)
    assert re.fullmatch("[0-9]{3}-[a-z]{2}", text)
    text, _ = chat(
        client, False, extra_body={"guided_choice": ["yes", "no", "maybe"]}, max_tokens=8
    )
    assert text in ("yes", "no", "maybe")
    grammar = 'root ::= "(" [0-9]+ ("+" [0-9]+)* ")"'
    text, _ = chat(client, False, extra_body={"guided_grammar": grammar}, max_tokens=30, seed=2)
    assert re.fullmatch(r"\(\d+(\+\d+)*\)", text), text


def test_bad_specs_get_400_and_the_engine_stays_whole(served):
    client, engine = served
    bad = [
        {"response_format": {"type": "xml"}},
        {"response_format": {"type": "json_schema",
                             "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
        {"extra_body": {"guided_regex": "(unclosed"}},
        {"extra_body": {"guided_grammar": "root ::= oops"}},
        {"extra_body": {"guided_json": "{not json"}},
        {"extra_body": {"guided_json": {"type": "object", "description": "x" * 70_000}}},
        {"response_format": {"type": "json_object"}, "extra_body": {"guided_regex": "a"}},
    ]  # fmt: skip
    for kwargs in bad:
        with pytest.raises(openai.BadRequestError):
            chat(client, False, max_tokens=8, **kwargs)
    text, reason = chat(client, False, max_tokens=4, temperature=0)  # still serving
    assert reason in ("length", "stop")
    wait_pool_whole(engine)


def test_the_benchmark_measures_both_runs_and_the_compile(tmp_path):
    from benchmarks.structured import main

    out = tmp_path / "structured.json"
    args = ["--preset", "tiny", "--batch", "4", "--tokens", "8", "--repeats", "1"]
    assert main([*args, "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert set(results["step_s"]) == {"unconstrained", "json_schema"}
    assert all(s > 0 for s in results["step_s"].values())
    assert results["schema_chars"] >= 2048 and results["compile_s"] > results["compile_cached_s"]
