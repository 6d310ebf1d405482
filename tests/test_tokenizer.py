"""Manta's tokenizer, detokenizer and chat templates against transformers' AutoTokenizer."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pydantic
import pytest
import transformers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workers.model.make_model import make_model
from workers.model.tokenizer import Tokenizer

TEXTS = [
    "",
    "a",
    "Hello, world!",
    "The model serves every request from the prefix cache.",
    "  leading spaces",
    "trailing spaces   ",
    "runs   of    spaces\n\n\n\ttabs\t\tand\r\nnewlines \n ",
    "emoji 😀👍🏽👩‍💻🇫🇷 and 🦩🧬 rare ones",
    "CJK 你好世界，こんにちは、안녕하세요。中文测试",
    "mixed: café naïve Ünïcödé — “quotes” ‘single’ 123,456.78 e\u0301",
    "def f(x):\n    return x ** 2  # comment\n",
    '{"key": [1, 2.5, null], "k2": "v"}',
    "<|im_start|>user\nhi<|im_end|>\n<|begin_of_text|> special tokens in text",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math 𝑥² ∑ ∫ ≤ ≥",
    "x" * 300 + " 😀" * 20,
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"}],
    [
        {"role": "system", "content": "Be kind 😀"},
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "Hello!\n  How can I help?"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "parts "}, {"type": "text", "text": "ok"}],
        },
        {"role": "assistant", "content": None, "reasoning_content": "hmm"},
    ],
]

COMPLEX_TEMPLATE = """{%- set ns = namespace(count=0) -%}
{%- if tools %}Tools: {{ tools | tojson }}
{% endif %}
{%- for message in messages %}
    {%- if message.role not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('unknown role ' + message.role) }}
    {%- endif %}
    {%- set ns.count = ns.count + 1 %}
    {%- if message.role == 'assistant' %}
[A{{ ns.count }}] {% generation %}{{ message.content | trim }}{% endgeneration %}
    {%- else %}
[{{ message.role[0] | upper }}{{ ns.count }}] {{ message.content }}
    {%- endif %}
    {%- if loop.index > 5 %}{% break %}{% endif %}
{% endfor %}
{%- if add_generation_prompt %}[A] {{ bos_token }}{{ flavor | default('plain') }}{% endif %}"""


@pytest.fixture(scope="module", params=["v4", "v5"])
def pair(request, tmp_path_factory) -> tuple[Tokenizer, transformers.PreTrainedTokenizerBase]:
    """(Manta tokenizer, transformers tokenizer) of one tiny checkpoint per layout."""
    arch = "llama" if request.param == "v4" else "qwen2"
    model_dir = make_model(
        tmp_path_factory.mktemp(request.param), "tiny", arch, layout=request.param
    )
    return Tokenizer.from_pretrained(model_dir), transformers.AutoTokenizer.from_pretrained(
        model_dir
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("base"), "tiny")


def _variant(model_dir: Path, tmp_path: Path, edit_config=None) -> Path:
    """A copy of `model_dir` with tokenizer_config.json changed by `edit_config`."""
    out = tmp_path / "variant"
    shutil.copytree(model_dir, out)
    if edit_config is not None:
        path = out / "tokenizer_config.json"
        config = json.loads(path.read_text())
        edit_config(config)
        path.write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(pair, text: str) -> None:
    tok, ref = pair
    for add_special in (True, False):
        ids = tok.encode(text, add_special_tokens=add_special)
        assert ids == ref(text, add_special_tokens=add_special)["input_ids"]
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == ref.decode(
                ids, skip_special_tokens=skip
            )
    assert tok.encode(text)[:1] == [tok.bos_token_id]


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=st.text(max_size=60))
def test_encode_matches_transformers_on_any_text(pair, text: str) -> None:
    tok, ref = pair
    ids = tok.encode(text)
    assert ids == ref(text)["input_ids"]
    assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)


def test_special_ids_and_sizes(pair) -> None:
    tok, ref = pair
    assert tok.vocab_size == len(ref)
    assert tok.bos_token_id == ref.bos_token_id == ref.convert_tokens_to_ids("<|begin_of_text|>")
    assert tok.pad_token_id == ref.pad_token_id == ref.convert_tokens_to_ids("<|pad|>")
    ends = {ref.convert_tokens_to_ids(t) for t in ("<|end_of_text|>", "<|im_end|>")}
    assert tok.eos_token_ids == frozenset(ends)
    assert ref.eos_token_id in tok.eos_token_ids


def _stream(tok: Tokenizer, ids: list[int], prompt_ids=None, skip: bool = True) -> list[str]:
    detok = tok.detokenizer(prompt_ids, skip_special_tokens=skip)
    deltas = [detok.push(i) for i in ids]
    deltas.append(detok.flush())
    assert detok.text == "".join(deltas)
    return deltas


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_detokenization(pair, text: str) -> None:
    tok, _ = pair
    ids = tok.encode(text, add_special_tokens=False)
    prompt = tok.encode("A prompt that ends here: ")
    for prompt_ids in (None, prompt):
        for skip in (True, False):
            deltas = _stream(tok, ids, prompt_ids, skip)
            assert not any("\ufffd" in d for d in deltas)
            assert deltas[-1] == ""  # nothing held back at the end of valid text
            assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)


def test_detokenizer_holds_back_split_characters(pair) -> None:
    tok, _ = pair
    ids = tok.encode("🦩", add_special_tokens=False)
    assert len(ids) > 1  # a rare emoji is several byte tokens
    detok = tok.detokenizer()
    assert [detok.push(i) for i in ids] == [""] * (len(ids) - 1) + ["🦩"]
    detok = tok.detokenizer()
    detok.push(ids[0])
    assert detok.flush() == tok.decode(ids[:1]) == "\ufffd"  # an unfinished character at the end


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_incremental_detokenization_of_arbitrary_ids(pair, data) -> None:
    tok, ref = pair
    ids = data.draw(st.lists(st.integers(0, tok.vocab_size - 1), max_size=40))
    skip = data.draw(st.booleans())
    assert "".join(_stream(tok, ids, skip=skip)) == ref.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(pair, conversation, add_generation_prompt) -> None:
    tok, ref = pair
    ours = tok.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
    expected = ref.apply_chat_template(
        conversation, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    assert ours == expected
    assert ours.startswith("<|begin_of_text|><|im_start|>")
    assert ours.endswith("<|im_start|>assistant\n") == add_generation_prompt
    tokens = ref.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
    assert tok.encode(ours, add_special_tokens=False) == tokens["input_ids"]


def test_tools_and_tool_calls_render_as_transformers_does(pair) -> None:
    """The builder's template lists tools, calls and results the way Qwen2.5's does."""
    tok, ref = pair
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "<d> ü",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    call = {
        "id": "c1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Oslo"}},
    }
    conversation = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "rain", "tool_call_id": "c1"},
    ]  # fmt: skip
    for history in (conversation, conversation[1:]):
        ours = tok.apply_chat_template(history, tools=tools)
        assert ours == ref.apply_chat_template(
            history, tools=tools, add_generation_prompt=True, tokenize=False
        )
        assert '<tools>\n{"type": "function"' in ours
        assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}' in ours
        assert "<tool_response>\nrain\n</tool_response>" in ours


def test_default_adds_generation_prompt(pair) -> None:
    tok, _ = pair
    assert tok.apply_chat_template(CONVERSATIONS[0]).endswith("<|im_start|>assistant\n")


def test_complex_template_features(model_dir: Path, tmp_path: Path) -> None:
    """namespace, tojson, raise_exception, loop controls, {% generation %}, extra variables."""
    out = _variant(model_dir, tmp_path)
    (out / "chat_template.jinja").write_text(COMPLEX_TEMPLATE)  # wins over tokenizer_config
    tok, ref = Tokenizer.from_pretrained(out), transformers.AutoTokenizer.from_pretrained(out)
    conversation = CONVERSATIONS[2] + [{"role": "user", "content": f"m{i}"} for i in range(4)]
    tools = [{"name": "f", "description": "<tag> & ü", "parameters": {"type": "object"}}]
    for extra in ({}, {"flavor": "spicy"}, {"tools": tools}):
        for gen in (True, False):
            ours = tok.apply_chat_template(conversation, add_generation_prompt=gen, **extra)
            expected = ref.apply_chat_template(
                conversation, add_generation_prompt=gen, tokenize=False, **extra
            )
            assert ours == expected
    with pytest.raises(Exception, match="unknown role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


def test_named_chat_templates(model_dir: Path, tmp_path: Path) -> None:
    def edit(config: dict) -> None:
        config["chat_template"] = [
            {"name": "default", "template": "D{% for m in messages %}{{ m.content }}{% endfor %}"},
            {"name": "tool_use", "template": "T{{ tools | length }}{{ messages[0].content }}"},
        ]

    out = _variant(model_dir, tmp_path, edit)
    tok, ref = Tokenizer.from_pretrained(out), transformers.AutoTokenizer.from_pretrained(out)
    msgs = [{"role": "user", "content": "hi"}]
    for extra in ({}, {"tools": [{"name": "f"}]}):
        expected = ref.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=True, **extra
        )
        assert tok.apply_chat_template(msgs, **extra) == expected
    assert tok.apply_chat_template(msgs, tools=[{"name": "f"}]) == "T1hi"


def test_add_bos_token_in_config_does_not_override_tokenizer_json(model_dir, tmp_path) -> None:
    """transformers 5 keeps tokenizer.json's post-processor whatever `add_bos_token` says."""
    out = _variant(model_dir, tmp_path, lambda c: c.update(add_bos_token=False))
    tok, ref = Tokenizer.from_pretrained(out), transformers.AutoTokenizer.from_pretrained(out)
    assert tok.encode("hello") == ref("hello")["input_ids"]


def test_missing_tokenizer_json(model_dir: Path, tmp_path: Path) -> None:
    out = _variant(model_dir, tmp_path)
    (out / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(out)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path / "does-not-exist")


def test_missing_chat_template(model_dir: Path, tmp_path: Path) -> None:
    out = _variant(model_dir, tmp_path, lambda c: c.pop("chat_template"))
    tok = Tokenizer.from_pretrained(out)
    assert tok.encode("still works") == Tokenizer.from_pretrained(model_dir).encode("still works")
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize(
    ("file", "field", "value"),
    [
        ("tokenizer_config.json", "chat_template", 5),
        ("tokenizer_config.json", "eos_token", 7),
        ("generation_config.json", "eos_token_id", "x"),
    ],
)
def test_bad_fields_are_named(model_dir: Path, tmp_path: Path, file, field, value) -> None:
    out = _variant(model_dir, tmp_path)
    config = json.loads((out / file).read_text())
    config[field] = value
    (out / file).write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"{file}.*{field}"):
        Tokenizer.from_pretrained(out)


def test_eos_ids_fall_back_to_config_json(model_dir: Path, tmp_path: Path) -> None:
    out = _variant(model_dir, tmp_path)
    (out / "generation_config.json").unlink()
    config = json.loads((out / "config.json").read_text())
    config["eos_token_id"] = 3
    (out / "config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_pretrained(out)
    assert tok.eos_token_ids == {3, tok.encode("<|im_end|>", add_special_tokens=False)[0]}


def test_tokens_declared_only_in_config_are_added(model_dir: Path, tmp_path: Path) -> None:
    def edit(config: dict) -> None:
        extra = {"content": "<|tool|>", "lstrip": False, "normalized": False, "rstrip": False}
        config["added_tokens_decoder"]["1024"] = {**extra, "single_word": False, "special": True}
        config["pad_token"] = "<|newpad|>"

    out = _variant(model_dir, tmp_path, edit)
    tok, ref = Tokenizer.from_pretrained(out), transformers.AutoTokenizer.from_pretrained(out)
    assert tok.vocab_size == len(ref) == 1026
    assert tok.pad_token_id == ref.pad_token_id
    text = "a <|tool|> b <|newpad|>c"
    assert tok.encode(text) == ref(text)["input_ids"]
    ids = tok.encode(text)
    assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)


def test_messages_may_be_models_or_dataclasses(pair) -> None:
    @dataclasses.dataclass
    class Part:
        type: str
        text: str

    class Message(pydantic.BaseModel):
        role: str
        content: str | list[Part]

    tok, _ = pair
    dicts = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    objects = [Message(role="user", content=[Part("text", "hi")])]
    assert tok.apply_chat_template(objects) == tok.apply_chat_template(dicts)
