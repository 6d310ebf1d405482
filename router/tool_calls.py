"""Tool calls read out of generated text as it streams.

Every format a model writes its calls in is some content, then a marker, then a run of JSON
objects with a name and an arguments object, and separators that hold no `{`:

- hermes (Qwen2.5, Hermes): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, repeated;
- llama3_json (Llama 3.1): `{"name": ..., "parameters": {...}}` at the very start of the reply
  (after an optional `<|python_tag|>`), several joined by `;`;
- mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`.

A required tool_choice constrains the reply to a JSON array of `{"name", "parameters"}` objects
(the "required" format), and a named one to the arguments object alone ("named"). One
`ToolCallScanner` per choice reads the text in whatever pieces it arrives and yields content and
call pieces in OpenAI's stream shape: a call's id and name first, then its argument text, in
fragments that join to exactly the text the model wrote. Reading the whole text at once gives
the same calls, so a streamed reply and an unstreamed one agree.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

PARSERS = ("hermes", "llama3_json", "mistral")
_MARKERS = {"hermes": "<tool_call>", "mistral": "[TOOL_CALLS]"}
_LLAMA_TAG = "<|python_tag|>"
_ARGUMENT_KEYS = ("arguments", "parameters")


def default_parser(chat_template: str) -> str:
    """The format a chat template teaches its model, by the markers it writes."""
    if "[TOOL_CALLS]" in chat_template:
        return "mistral"
    if _LLAMA_TAG in chat_template or "ipython" in chat_template:
        return "llama3_json"
    return "hermes"


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(slots=True)
class CallPiece:
    """Part of call `index`: its id and name (the first piece), or more argument text."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass(slots=True)
class Call:
    id: str
    name: str
    arguments: str = ""


@dataclass(slots=True)
class _Object:
    """One call object being read: a string-aware brace scanner that finds, at the top level,
    the name's value and the verbatim text of the arguments' value."""

    text: str = ""
    depth: int = 0
    in_string: bool = False
    escaped: bool = False
    token_start: int = -1  # where the string being read starts (its opening quote)
    last_string: str | None = None  # the last top-level string read (a key or a value)
    key: str | None = None  # the key whose value comes next
    name: str | None = None
    args_start: int = -1  # where the arguments' value starts in `text`
    args_end: int = -1  # just past its end, once it has ended
    args_streams: bool = False  # an object or array value, streamed as it is written

    def feed(self, char: str) -> bool:
        """Read one character; True once the object has closed."""
        self.text += char
        at = len(self.text) - 1
        if self.in_string:
            if self.escaped:
                self.escaped = False
            elif char == "\\":
                self.escaped = True
            elif char == '"':
                self.in_string = False
                if self.depth == 1:
                    self._top_level_string(self.text[self.token_start : at + 1])
            return False
        if self.args_start >= 0 and self.args_end < 0 and self.depth == 1 and char in ",}":
            self.args_end = at  # a scalar argument value (or a string one) ended here
        if char == '"':
            self.in_string = True
            self.token_start = at
            self._maybe_args_start(at)
        elif char in "{[":
            self._maybe_args_start(at, container=True)
            self.depth += 1
        elif char in "}]":
            self.depth -= 1
            if self.depth == 1 and self.args_start >= 0 and self.args_end < 0:
                self.args_end = at + 1
            return self.depth == 0
        elif char == ":" and self.depth == 1:
            self.key, self.last_string = self.last_string, None
        elif not char.isspace():
            self._maybe_args_start(at)
        return False

    def _top_level_string(self, literal: str) -> None:
        try:
            value = json.loads(literal)
        except ValueError:  # a model may write escapes JSON has not: keep them as written
            value = literal[1:-1]
        if self.key == "name" and self.name is None and isinstance(value, str):
            self.name = value
            self.key = None
        else:
            self.last_string = value

    def _maybe_args_start(self, at: int, container: bool = False) -> None:
        if self.depth == 1 and self.key in _ARGUMENT_KEYS and self.args_start < 0:
            self.args_start, self.args_streams = at, container
            self.key = None

    def arguments_so_far(self) -> str:
        """The arguments' text read so far, when it can stream (an object or array, written
        out as is); any other value is only known whole, once the object closes."""
        if self.args_start < 0 or not self.args_streams:
            return ""
        end = self.args_end if self.args_end >= 0 else len(self.text)
        return self.text[self.args_start : end]

    def arguments(self) -> str:
        if self.args_start < 0:
            return "{}"
        end = self.args_end if self.args_end >= 0 else len(self.text)
        raw = self.text[self.args_start : end].strip()
        if self.args_streams:
            return raw
        try:
            value = json.loads(raw)  # arguments given as a string of JSON, or a bare value
        except ValueError:
            return raw
        return value if isinstance(value, str) else json.dumps(value)


@dataclass
class ToolCallScanner:
    """Reads one choice's text for tool calls in `format` (a parser name, "required" or
    "named"); `name` is the function of a named tool_choice."""

    format: str
    name: str | None = None
    calls: list[Call] = field(default_factory=list)
    _held: str = ""  # text that may yet turn out to begin the marker
    _in_calls: bool = False
    _decided: bool = False  # llama3_json and required: whether the reply opened with a call
    _object: _Object | None = None
    _streamed_args: int = 0  # characters of the current call's arguments already handed out

    def __post_init__(self) -> None:
        if self.format not in (*PARSERS, "required", "named"):
            raise ValueError(f"unknown tool call parser {self.format!r}; choose from {PARSERS}")
        if self.format == "named":
            self._in_calls = True

    def feed(self, text: str) -> tuple[str, list[CallPiece]]:
        """Content to show now, and call pieces, for the next piece of generated text."""
        if self.format == "named":
            return "", self._named(text)
        content, pieces = "", []
        self._held += text
        if not self._in_calls:
            content = self._content()
        if self._in_calls:
            text, self._held = self._held, ""
            for char in text:
                pieces += self._read(char)
            pieces += self._stream_arguments()
        return content, pieces

    def finish(self) -> str:
        """Held text that never became a call: content after all."""
        held, self._held = self._held, ""
        return "" if self._in_calls else held

    @property
    def found_calls(self) -> bool:
        return bool(self.calls)

    # -- content until the calls begin -------------------------------------------------------
    def _content(self) -> str:
        if self.format in ("llama3_json", "required"):
            return self._content_at_start()
        marker = _MARKERS[self.format]
        at = self._held.find(marker)
        if at >= 0:
            content, self._held = self._held[:at], self._held[at + len(marker) :]
            self._in_calls = True
            return content
        keep = _partial_suffix(self._held, marker)
        content, self._held = (
            self._held[: len(self._held) - keep],
            self._held[-keep:] if keep else "",
        )
        return content

    def _content_at_start(self) -> str:
        """llama3_json and required: a call only opens the reply; anything else is content."""
        if self._decided:
            content, self._held = self._held, ""
            return content
        stripped = self._held.lstrip()
        if not stripped or (_LLAMA_TAG.startswith(stripped) and self.format == "llama3_json"):
            return ""  # not yet known
        if self.format == "llama3_json" and stripped.startswith(_LLAMA_TAG):
            stripped = stripped[len(_LLAMA_TAG) :].lstrip()
            if not stripped:
                return ""
        self._decided = True
        if stripped[0] in "{[":
            self._in_calls, self._held = True, stripped
            return ""
        content, self._held = self._held, ""
        return content

    # -- the calls -------------------------------------------------------------------------
    def _read(self, char: str) -> list[CallPiece]:
        if self._object is None:
            if char != "{":
                return []  # a separator: brackets, commas, semicolons, end tags
            self._object = _Object()
        pieces = []
        current = self._object
        named_before = current.name is not None
        closed = current.feed(char)
        if current.name is not None and not named_before:
            self.calls.append(Call(new_call_id(), current.name))
            pieces.append(CallPiece(len(self.calls) - 1, self.calls[-1].id, current.name))
        if closed:
            pieces += self._stream_arguments()
            if current.name is not None:
                call = self.calls[-1]
                # What did not stream: all of a string or scalar value, known only now.
                rest = current.arguments()
                tail = rest[len(call.arguments) :]
                if tail:
                    pieces.append(CallPiece(len(self.calls) - 1, arguments=tail))
                call.arguments = rest
            self._object, self._streamed_args = None, 0
        return pieces

    def _stream_arguments(self) -> list[CallPiece]:
        current = self._object
        if current is None or current.name is None:
            return []
        text = current.arguments_so_far()
        if len(text) <= self._streamed_args:
            return []
        call = self.calls[-1]
        new = text[self._streamed_args :]
        self._streamed_args = len(text)
        call.arguments += new
        return [CallPiece(len(self.calls) - 1, arguments=new)]

    def _named(self, text: str) -> list[CallPiece]:
        pieces = []
        if not self.calls:
            self.calls.append(Call(new_call_id(), self.name or ""))
            pieces.append(CallPiece(0, self.calls[0].id, self.name))
        if text:
            self.calls[0].arguments += text
            pieces.append(CallPiece(0, arguments=text))
        return pieces


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that begins `marker`."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0
