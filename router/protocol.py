"""OpenAI-compatible request and response models for Manta's HTTP API.

Requests are strict and reject unknown fields, as OpenAI does; `validation_error_body` turns a
validation failure into OpenAI's error body. Known OpenAI parameters that Manta does not
implement are accepted only at their neutral value, so a request never silently means
something else. Manta's extras (`top_k`, `min_p`, `ignore_eos`, `priority`) follow vLLM.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

FinishReason = Literal["stop", "length", "tool_calls"]
COMPLETION_DEFAULT_MAX_TOKENS = 16
"""OpenAI's legacy completions default; chat defaults to the rest of the context window."""
MAX_STOP_SEQUENCES = 4
MAX_STOP_LENGTH = 1024  # characters per stop string: matching is linear, but bounded work
MAX_CHOICES = 64  # prompts x n in one request: each choice is a request on a worker
MAX_CACHE_SALT_LENGTH = 256
MAX_LOGIT_BIAS = 1024  # entries of logit_bias
MAX_TOOLS = 128
MAX_PARALLEL_TOOL_CALLS = 8  # calls in one reply under a required tool_choice
FUNCTION_NAME = r"^[A-Za-z0-9_.-]{1,64}$"  # OpenAI's rule for function names
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch generators take; child seeds wrap within it

# Known OpenAI parameters Manta does not implement, and the values that mean "not used".
_NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    "echo": (None, False),
    "suffix": (None, ""),
    "best_of": (None, 1),
}
# Union-member tags pydantic puts in an error's location; they are not request fields.
_TYPE_TAGS = frozenset(
    {"str", "int", "float", "bool", "list", "dict", "TextPart", "NamedToolChoice"}
)


def _now() -> int:
    return int(time.time())


def new_id(prefix: str) -> str:
    """A fresh response id such as `chatcmpl-<32 hex digits>`."""
    return f"{prefix}-{uuid.uuid4().hex}"


def _reject_unless_neutral(value: Any, info: ValidationInfo) -> Any:
    if value not in _NEUTRAL_VALUES[info.field_name]:
        raise ValueError(f"{info.field_name} is not supported; omit it")
    return value


def _split_prompts(prompt: str | list[Any]) -> list[Any]:
    """One text or token-id list per batch entry."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]
    return list(prompt)


class _Strict(BaseModel):
    """Unknown fields and loose types are refused, as OpenAI does."""

    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool | None = False


class _SamplingRequest(_Strict):
    """Fields shared by completions and chat completions."""

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(None, max_length=MAX_LOGIT_BIAS)
    repetition_penalty: float | None = Field(None, gt=0, le=2, description="vLLM extra")
    min_tokens: int = Field(0, ge=0, description="No stop token or EOS before this many (vLLM)")
    response_format: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = Field(None, description="vLLM extra")
    guided_regex: str | None = Field(None, description="vLLM extra")
    guided_choice: list[str] | None = Field(None, min_length=1, description="vLLM extra")
    guided_grammar: str | None = Field(None, description="vLLM extra (EBNF)")
    user: str | None = None
    top_k: int | None = Field(None, ge=-1, description="-1 or 0: off (Manta extra)")
    min_p: float | None = Field(None, ge=0, le=1, description="Manta extra")
    ignore_eos: bool = Field(False, description="Manta extra")
    priority: int = Field(0, description="Lower is scheduled first (Manta extra)")
    cache_salt: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_CACHE_SALT_LENGTH,
        description="Requests share cached prefixes only under the same salt (vLLM extra).",
    )

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        if not all(stops):
            raise ValueError("stop sequences must be non-empty strings")
        if any(len(stop) > MAX_STOP_LENGTH for stop in stops):
            raise ValueError(f"stop sequences may have at most {MAX_STOP_LENGTH} characters")
        return value

    @field_validator("stream_options")
    @classmethod
    def _check_stream_options(
        cls, value: StreamOptions | None, info: ValidationInfo
    ) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return value

    @field_validator("response_format")
    @classmethod
    def _check_response_format(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        kind = (value or {}).get("type", "text")
        if kind not in ("text", "json_object", "json_schema"):
            raise ValueError("response_format type must be text, json_object or json_schema")
        if kind == "json_schema":
            spec = value.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
                raise ValueError("response_format json_schema needs {'name', 'schema'}")
        return value

    def structured_output(self) -> tuple[str, str] | None:
        """(kind, spec) of the one constraint set (SamplingParams.structured_output)."""
        found = []
        kind = (self.response_format or {}).get("type", "text")
        if kind == "json_object":
            found.append(("json_object", ""))
        elif kind == "json_schema":
            found.append(
                ("json", json.dumps(self.response_format["json_schema"].get("schema", {})))
            )
        if self.guided_json is not None:
            spec = self.guided_json
            found.append(("json", spec if isinstance(spec, str) else json.dumps(spec)))
        if self.guided_regex is not None:
            found.append(("regex", self.guided_regex))
        if self.guided_choice is not None:
            found.append(("choice", json.dumps(self.guided_choice)))
        if self.guided_grammar is not None:
            found.append(("grammar", self.guided_grammar))
        if len(found) > 1:
            raise ValueError("set at most one of response_format and the guided_* parameters")
        return found[0] if found else None

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for token, bias in (value or {}).items():
            if not token.isdigit():
                raise ValueError(f"logit_bias keys must be token ids, got {token[:20]!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias}")
        return value

    @field_validator(*_NEUTRAL_VALUES, check_fields=False)
    @classmethod
    def _check_unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        return _reject_unless_neutral(value, info)

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)

    def _sampling_kwargs(self, max_tokens: int | None, logprobs: int | None) -> dict[str, Any]:
        return {
            "n": self.n or 1,
            "max_tokens": max_tokens,
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "top_p": 1.0 if self.top_p is None else self.top_p,
            "top_k": -1 if self.top_k is None else self.top_k,
            "min_p": self.min_p or 0.0,
            "seed": self.seed,
            "stop": self.stop,
            "ignore_eos": self.ignore_eos,
            "logprobs": logprobs,
            "cache_salt": self.cache_salt,
            "presence_penalty": self.presence_penalty or 0.0,
            "frequency_penalty": self.frequency_penalty or 0.0,
            "repetition_penalty": self.repetition_penalty or 1.0,
            "logit_bias": {int(t): b for t, b in (self.logit_bias or {}).items()} or None,
            "min_tokens": self.min_tokens,
            "structured_output": self.structured_output(),
        }


class CompletionRequest(_SamplingRequest):
    """`POST /v1/completions`; a list prompt is a batch (choice index = prompt * n + i)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool | None = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value: str | list[Any]) -> str | list[Any]:
        prompts = _split_prompts(value)
        if not prompts or not all(prompts):
            raise ValueError("prompt must not be empty")
        if any(isinstance(prompt, list) and min(prompt) < 0 for prompt in prompts):
            raise ValueError("prompt token ids must be >= 0")
        return value

    @model_validator(mode="after")
    def _check_fan_out(self) -> CompletionRequest:
        count, n = len(self.prompts()), self.n or 1
        if count * n > MAX_CHOICES:
            raise ValueError(f"prompts x n may be at most {MAX_CHOICES}, got {count} x {n}")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompts of this request: text or token ids, one per batch entry."""
        return _split_prompts(self.prompt)

    def to_sampling_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `kvstore.sampling_params.SamplingParams`."""
        max_tokens = self.max_tokens or COMPLETION_DEFAULT_MAX_TOKENS
        return self._sampling_kwargs(max_tokens, self.logprobs)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionDefinition(_Strict):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Strict):
    name: str = Field(pattern=FUNCTION_NAME)


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


class FunctionCall(_Strict):
    name: str
    arguments: str  # JSON text, as the model wrote it


class ToolCall(_Strict):
    """A call the assistant made: in responses, and in the history a client sends back."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall

    def for_template(self) -> dict[str, Any]:
        """The call as chat templates take it: arguments as an object where they parse (the
        Qwen2.5 and Llama 3.1 templates serialize them themselves), else the text."""
        try:
            arguments = json.loads(self.function.arguments)
        except ValueError:
            arguments = self.function.arguments
        function = {"name": self.function.name, "arguments": arguments}
        return {"id": self.id, "type": "function", "function": function}


class ChatMessage(_Strict):
    """One message; content may be plain text or text parts (other part types are refused)."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = Field(None, validate_default=True)
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[ToolCall] | None = None

    @field_validator("content")
    @classmethod
    def _check_content(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None and info.data.get("role") != "assistant":
            raise ValueError("content is required unless the role is assistant")
        return value

    @field_validator("tool_calls")
    @classmethod
    def _check_tool_calls(cls, value: Any, info: ValidationInfo) -> Any:
        if value and info.data.get("role") != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return value

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates take it (`developer` becomes `system`, which is all
        templates know)."""
        message: dict[str, Any] = {
            "role": "system" if self.role == "developer" else self.role,
            "content": self.text(),
        }
        if self.tool_calls:
            message["tool_calls"] = [call.for_template() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            message["name"] = self.name
        return message

    def text(self) -> str:
        """The content as one string (parts joined by newlines, as vLLM does)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "\n".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingRequest):
    """`POST /v1/chat/completions`."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _check_tools(self) -> ChatCompletionRequest:
        names = [tool.function.name for tool in self.tools or ()]
        if len(set(names)) != len(names):
            raise ValueError("tools must have distinct function names")
        choice = self.tool_choice
        if choice not in (None, "none") and not names:
            raise ValueError("tool_choice needs tools")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"tool_choice names {choice.function.name!r}, which is not in tools")
        if self.forced_tool_schema() is not None and super().structured_output():
            raise ValueError("tool_choice required or named cannot be combined with a "
                             "response_format or guided_* constraint")  # fmt: skip
        return self

    @property
    def tool_mode(self) -> str:
        """ "none", "auto", "required" or "named": how tools shape this request's output."""
        if not self.tools or self.tool_choice == "none":
            return "none"
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return self.tool_choice or "auto"

    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools as chat templates take them; none when tool_choice is "none"."""
        if self.tool_mode == "none":
            return None
        return [tool.model_dump(exclude_none=True) for tool in self.tools or ()]

    def forced_tool_schema(self) -> dict[str, Any] | None:
        """The JSON schema a required or named tool_choice constrains the output to, as vLLM
        does: a named function's arguments object itself; for "required", an array of
        `{"name", "parameters"}` objects, one per call (one at most without parallel calls,
        else MAX_PARALLEL_TOOL_CALLS)."""
        mode = self.tool_mode
        if mode == "named":
            name = self.tool_choice.function.name
            tool = next(t for t in self.tools if t.function.name == name)
            return tool.function.parameters or {"type": "object"}
        if mode != "required":
            return None
        calls = [
            {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "enum": [tool.function.name]},
                    "parameters": tool.function.parameters or {"type": "object"},
                },
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
            for tool in self.tools
        ]
        most = MAX_PARALLEL_TOOL_CALLS if self.parallel_tool_calls else 1
        return {"type": "array", "minItems": 1, "maxItems": most, "items": {"anyOf": calls}}

    def structured_output(self) -> tuple[str, str] | None:
        """A forced tool_choice's schema, else what response_format or guided_* sets."""
        forced = self.forced_tool_schema()
        if forced is not None:
            return ("json", json.dumps(forced))
        return super().structured_output()

    @field_validator("top_logprobs")
    @classmethod
    def _check_top_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs to be true")
        return value

    def to_sampling_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `SamplingParams`; `max_tokens` is None when the client set
        neither limit: the caller fills in what is left of the context window."""
        max_tokens = self.max_completion_tokens or self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_kwargs(max_tokens, logprobs)


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> Usage:
        """Usage with the total and the prefix-cache hit filled in."""
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
        )


class CompletionLogprobs(BaseModel):
    """The legacy completions shape: parallel lists, one entry per generated token."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class CompletionResponse(BaseModel):
    """A completions response, and also each chunk of a completions stream."""

    id: str = Field(default_factory=lambda: new_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None

    @model_serializer(mode="wrap")
    def _drop_no_calls(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out = handler(self)
        if out.get("tool_calls") is None:
            out.pop("tool_calls", None)
        return out


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: new_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class _Sparse(BaseModel):
    """Unset fields are left out, as OpenAI's chunks do."""

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}


class DeltaFunctionCall(_Sparse):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(_Sparse):
    """A piece of a streamed call: its first names id, type and function name; the rest
    carry argument text, to be joined in order."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class DeltaMessage(_Sparse):
    """What a chunk adds (`{}` in the final chunk)."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    """One chunk of a chat stream; every chunk of a stream repeats its `id` and `created`."""

    id: str = Field(default_factory=lambda: new_id("chatcmpl"))
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "manta"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def error_body(
    message: str, type: str, param: str | None = None, code: str | int | None = None
) -> dict[str, Any]:
    """OpenAI's error body: `{"error": {"message", "type", "param", "code"}}`."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def validation_error_body(errors: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """OpenAI's 400 body for pydantic's (or FastAPI's) validation errors.

    It names the deepest error: for a union field that is the member that got furthest.
    """
    error = max(errors, key=lambda candidate: len(candidate.get("loc", ())))
    loc = [
        str(part)
        for part in error.get("loc", ())
        if part != "body" and part not in _TYPE_TAGS and "[" not in str(part)
    ]
    path = ".".join(loc)
    param = loc[0] if loc else None
    if error["type"] == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {path}"
    elif error["type"] == "missing":
        message = f"Missing required parameter: '{path}'."
    else:
        reason = str(error["msg"]).removeprefix("Value error, ")
        message = f"Invalid value for '{path}': {reason}" if path else reason
    return error_body(message, "invalid_request_error", param=param)
