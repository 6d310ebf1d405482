"""Tokenizer and chat template of a Hugging Face model directory, without transformers.

Encoding, decoding and chat rendering match what `transformers.AutoTokenizer` (version 5)
gives on the same directory, so prompts tokenize identically in Manta and in the reference.
"""

import dataclasses
import json
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
import numpy as np
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

from workers.model.detokenizer import IncrementalDetokenizer

SPECIAL_TOKEN_KEYS = (
    "bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
)  # fmt: skip
ADDED_TOKEN_FLAGS = ("single_word", "lstrip", "rstrip", "normalized", "special")
# Older names of a message's reasoning; transformers exposes it under both standard names.
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def _token_str(value: Any, field: str, source: Path) -> str | None:
    """A special token as written in a config: a string, or an AddedToken dict with `content`."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{source}: field {field!r} must be a string or a token object, got {value!r}")


def _id_list(value: Any, field: str, source: Path) -> list[int]:
    """`eos_token_id`-style fields hold an int, a list of ints, or null."""
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{source}: field {field!r} must be an int or a list of ints")
    return values


class _GenerationTag(jinja2.ext.Extension):
    """Accepts `{% generation %}...{% endgeneration %}` (assistant-mask markers) and renders
    the body unchanged, as transformers does when it is not computing masks."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_render", [])
        return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore attributes, closing a sandbox escape route."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
    sort_keys: bool = False,
) -> str:  # fmt: skip
    # Unlike jinja's own filter this does not HTML-escape, like the templates expect.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _compile_chat_template(source: str) -> jinja2.Template:
    """Compiles a chat template in the sandboxed environment transformers renders them in."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["namespace"] = _Namespace
    return env.from_string(source)


def _plain(value: Any) -> Any:
    """A copy made only of JSON-like types, so a template can reach no methods of rich objects
    (pydantic models and dataclasses become dicts, other objects a `<TypeName>` string)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for base, convert in ((str, str.__str__), (int, int.__int__), (float, float.__float__)):
        if isinstance(value, base):
            return convert(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.generic):
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _load_chat_templates(model_dir: Path, config: dict[str, Any]) -> dict[str, str]:
    """Named templates; separate `.jinja` files (transformers 5 layout) win over the config."""
    templates: dict[str, str] = {}
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        templates["default"] = jinja_file.read_text(encoding="utf-8")
    for extra in sorted((model_dir / "additional_chat_templates").glob("*.jinja")):
        templates[extra.name.removesuffix(".jinja")] = extra.read_text(encoding="utf-8")
    if templates:
        return templates
    raw = config.get("chat_template")
    if raw is None or isinstance(raw, str):
        return {} if raw is None else {"default": raw}
    if isinstance(raw, list) and all(
        isinstance(t, dict)
        and isinstance(t.get("name"), str)
        and isinstance(t.get("template"), str)
        for t in raw
    ):
        return {t["name"]: t["template"] for t in raw}
    raise ValueError(
        f"{model_dir / 'tokenizer_config.json'}: field 'chat_template' must be a string or a "
        "list of {name, template} objects"
    )


GIL_FREE_CHARS = 8192  # texts longer than this are tokenized without holding the GIL


class Tokenizer:
    """Text <-> token ids and chat rendering for one model directory."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        special_tokens: dict[str, str],
        chat_templates: dict[str, str],
        generation_eos_ids: list[int],
    ) -> None:
        self._backend = backend
        self._special_tokens = special_tokens
        self._chat_templates = {n: _compile_chat_template(s) for n, s in chat_templates.items()}
        self.chat_template_sources = dict(chat_templates)  # read for the tool-call format
        eos = set(generation_eos_ids)
        if (eos_id := self._special_id("eos_token")) is not None:
            eos.add(eos_id)
        self._eos_ids = frozenset(eos)
        self._specials: list[str] | None = None
        self._plain: tokenizers.Tokenizer | None = None

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> "Tokenizer":
        """Loads tokenizer.json plus the optional tokenizer, generation and model configs."""
        root = Path(model_dir)
        tok_file = root / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(f"no tokenizer.json in model directory {str(root)!r}")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tok_file))
        except Exception as e:
            raise ValueError(f"{tok_file} could not be loaded: {e}") from None
        cfg_file = root / "tokenizer_config.json"
        config = _read_json(cfg_file) if cfg_file.is_file() else {}
        map_file = root / "special_tokens_map.json"
        legacy = _read_json(map_file) if map_file.is_file() else {}
        special: dict[str, str] = {}
        for key in SPECIAL_TOKEN_KEYS:
            token = _token_str(config.get(key), key, cfg_file)
            if token is None:
                token = _token_str(legacy.get(key), key, map_file)
            if token is not None:
                special[key] = token
        # Tokens the configs declare but tokenizer.json lacks are appended, as transformers does.
        added = config.get("added_tokens_decoder") or {}
        for _, entry in sorted(added.items(), key=lambda kv: int(kv[0])):
            content = _token_str(entry, "added_tokens_decoder", cfg_file)
            if content is not None and backend.token_to_id(content) is None:
                flags = {k: bool(entry[k]) for k in ADDED_TOKEN_FLAGS if k in entry}
                backend.add_tokens([tokenizers.AddedToken(content, **flags)])
        missing = [t for t in special.values() if backend.token_to_id(t) is None]
        backend.add_special_tokens([tokenizers.AddedToken(t, special=True) for t in missing])
        eos_ids: list[int] = []
        for name in ("generation_config.json", "config.json"):
            path = root / name
            if path.is_file() and "eos_token_id" in (data := _read_json(path)):
                eos_ids = _id_list(data["eos_token_id"], "eos_token_id", path)
                break
        return cls(backend, special, _load_chat_templates(root, config), eos_ids)

    def _special_id(self, key: str) -> int | None:
        token = self._special_tokens.get(key)
        return None if token is None else self._backend.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (transformers' `len(tokenizer)`)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Ids that end generation: generation_config's (else config's) plus the eos token."""
        return self._eos_ids

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` applies tokenizer.json's post-processor
        (e.g. a leading BOS). Tokenize a rendered chat with False, as transformers does."""
        if len(text) > GIL_FREE_CHARS:
            # encode_batch releases the GIL and encode does not: while a long text is
            # tokenized, the server's other threads (its event loop, /health) keep running.
            return self._backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_chat(self, rendered: str, contents: list[str]) -> list[int]:
        """Token ids of a rendered chat in which the messages' `contents` are text only: a
        special token typed in a message (`<|im_end|>`, say) is encoded as the characters it
        is made of, so no one can forge a turn; the template's own control tokens are kept.
        Identical to `encode(rendered, False)` when no content holds a special token."""
        specials = self._special_strings()
        if not any(token in content for content in contents for token in specials):
            return self.encode(rendered, add_special_tokens=False)
        ids: list[int] = []
        cursor = 0
        for content in contents:
            start = rendered.find(content, cursor) if content else -1
            if start < 0:
                continue  # the template rewrote this content: it is encoded with the rest
            ids += self.encode(rendered[cursor:start], add_special_tokens=False)
            ids += self._text_only().encode(content, add_special_tokens=False).ids
            cursor = start + len(content)
        return ids + self.encode(rendered[cursor:], add_special_tokens=False)

    def _special_strings(self) -> list[str]:
        if self._specials is None:
            added = self._backend.get_added_tokens_decoder().values()
            self._specials = [token.content for token in added if token.special]
        return self._specials

    def _text_only(self) -> tokenizers.Tokenizer:
        """A copy of the tokenizer that reads special-token strings as plain text."""
        if self._plain is None:
            plain = tokenizers.Tokenizer.from_str(self._backend.to_str())
            plain.encode_special_tokens = True
            self._plain = plain
        return self._plain

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def detokenizer(
        self,
        prompt_ids: list[int] | None = None,
        skip_special_tokens: bool = True,
        unemitted: int = 0,
    ) -> IncrementalDetokenizer:
        """A streaming decoder for one request's generated tokens (and the prompt's last
        `unemitted` ones, whose text was never emitted)."""
        return IncrementalDetokenizer(self._backend, prompt_ids, skip_special_tokens, unemitted)

    def _template(self, tools: Any) -> jinja2.Template:
        templates = self._chat_templates
        if not templates:
            raise ValueError(
                "this model has no chat template (no chat_template.jinja and no 'chat_template' "
                "in tokenizer_config.json); use a completion prompt instead"
            )
        if tools is not None and "tool_use" in templates:
            return templates["tool_use"]
        if "default" in templates:
            return templates["default"]
        raise ValueError(f"this model has chat templates {sorted(templates)} but no 'default' one")

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **extra: Any
    ) -> str:
        """Renders a conversation as transformers' `apply_chat_template(..., tokenize=False)`.

        `extra` (e.g. `tools`, `documents`, `enable_thinking`) is passed to the template and
        overrides the special-token variables of the same name.
        """
        tools = extra.pop("tools", None)
        documents = extra.pop("documents", None)
        template = self._template(tools)
        if not messages:
            raise ValueError("cannot apply the chat template to an empty conversation")
        chat = []
        for message in _plain(list(messages)):
            if not isinstance(message, dict):
                raise TypeError(f"chat messages must be dicts, got {message!r}")
            message = {k: v for k, v in message.items() if v is not None}
            reasoning = next((message[k] for k in REASONING_FIELDS if k in message), None)
            if reasoning is not None:
                message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
            chat.append(message)
        return template.render(
            messages=chat,
            tools=_plain(tools),
            documents=_plain(documents),
            add_generation_prompt=add_generation_prompt,
            **{**self._special_tokens, **_plain(extra)},
        )
