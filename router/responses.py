"""Turn workers' stream deltas into OpenAI responses and stream chunks.

One formatter per HTTP request. Choice `i` is prompt `i // n`, sample `i % n`. Usage counts
each prompt once, however many samples it has, as OpenAI does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvstore.messages import RequestDelta, TokenLogprobs
from router.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    TokenLogprob,
    ToolCall,
    TopLogprob,
    Usage,
    new_id,
)
from router.tool_calls import CallPiece, ToolCallScanner


@dataclass(slots=True)
class _Choice:
    text: str = ""
    finish_reason: str | None = None  # the worker's
    reported_reason: str | None = None  # what the client was told (tool_calls, for one)
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    logprobs: list[TokenLogprobs] = field(default_factory=list)


class _Formatter:
    id_prefix = "cmpl"

    def __init__(self, body: Any, frontend: Any, prompts: list[list[int]], sampling: dict) -> None:
        self.body = body
        self.tokenizer = frontend.tokenizer
        self.model = frontend.model_name
        self.n = body.n or 1
        self.prompts = prompts
        self.choices = [_Choice() for _ in range(len(prompts) * self.n)]
        self.id = new_id(self.id_prefix)
        self.wants_logprobs = sampling["logprobs"] is not None

    def _record(self, index: int, delta: RequestDelta) -> _Choice:
        choice = self.choices[index]
        choice.text += delta.new_text
        choice.num_output_tokens = delta.num_output_tokens or choice.num_output_tokens
        choice.num_cached_tokens = delta.num_cached_tokens
        if delta.finished:
            choice.finish_reason = delta.finish_reason
        if delta.new_logprobs:
            choice.logprobs.extend(delta.new_logprobs)
        return choice

    def usage(self) -> Usage:
        firsts = self.choices[:: self.n]
        return Usage.of(
            prompt_tokens=sum(len(p) for p in self.prompts),
            completion_tokens=sum(c.num_output_tokens for c in self.choices),
            cached_tokens=sum(c.num_cached_tokens for c in firsts),
        )

    def _token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def add(self, index: int, delta: RequestDelta) -> None:
        self._record(index, delta)

    def finish_reasons(self) -> list[str]:
        """Each choice's finish reason as the client got it, for /metrics."""
        return [c.reported_reason or c.finish_reason or "stop" for c in self.choices]


class CompletionFormatter(_Formatter):
    id_prefix = "cmpl"

    def _logprobs(self, entries, offset: int) -> CompletionLogprobs | None:
        if not self.wants_logprobs:
            return None
        out = CompletionLogprobs()
        for entry in entries:
            token_id, logprob, top = entry.token_id, entry.logprob, entry.top
            token = self._token(token_id)
            out.tokens.append(token)
            out.token_logprobs.append(logprob)
            out.top_logprobs.append({self._token(t): lp for t, lp in top.items()})
            out.text_offset.append(offset)
            offset += len(token)
        return out

    def response(self) -> dict:
        choices = [
            CompletionChoice(
                index=i,
                text=c.text,
                logprobs=self._logprobs(c.logprobs, 0),
                finish_reason=c.finish_reason,
            )
            for i, c in enumerate(self.choices)
        ]
        return CompletionResponse(
            id=self.id, model=self.model, choices=choices, usage=self.usage()
        ).model_dump()

    def chunks(self, index: int, delta: RequestDelta) -> list[str]:
        offset = len(self.choices[index].text)
        self._record(index, delta)
        choice = CompletionChoice(
            index=index,
            text=delta.new_text,
            logprobs=self._logprobs(delta.new_logprobs or [], offset),
            finish_reason=delta.finish_reason if delta.finished else None,
        )
        chunk = CompletionResponse(id=self.id, model=self.model, choices=[choice])
        return [chunk.model_dump_json(exclude={"usage"})]

    def usage_chunk(self) -> str:
        return CompletionResponse(
            id=self.id, model=self.model, choices=[], usage=self.usage()
        ).model_dump_json()


class ChatFormatter(_Formatter):
    """Chat responses and chunks; with tools, each choice's text is read for tool calls
    (router/tool_calls.py) in the format the request's tool_choice and the server imply."""

    id_prefix = "chatcmpl"

    def __init__(self, body: Any, frontend: Any, prompts: list[list[int]], sampling: dict) -> None:
        super().__init__(body, frontend, prompts, sampling)
        self._started: set[int] = set()
        mode = body.tool_mode
        self.tool_format = None if mode == "none" else (
            frontend.tool_call_parser if mode == "auto" else mode)  # fmt: skip
        self.tool_name = body.tool_choice.function.name if mode == "named" else None
        self._scanners = [self._scanner() for _ in self.choices]

    def _scanner(self) -> ToolCallScanner | None:
        if self.tool_format is None:
            return None
        return ToolCallScanner(self.tool_format, self.tool_name)

    def _finish_reason(self, reason: str | None, scanner: ToolCallScanner | None) -> str:
        if scanner is not None and scanner.found_calls and reason in (None, "stop"):
            return "tool_calls"
        return reason or "stop"

    def _message(self, choice: _Choice) -> tuple[AssistantMessage, str]:
        scanner = self._scanner()
        if scanner is None:
            return AssistantMessage(content=choice.text), choice.finish_reason or "stop"
        content, _ = scanner.feed(choice.text)
        content += scanner.finish()
        calls = [
            ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments))
            for c in scanner.calls
        ]
        message = AssistantMessage(content=content or None if calls else content,
                                   tool_calls=calls or None)  # fmt: skip
        return message, self._finish_reason(choice.finish_reason, scanner)

    def _logprobs(self, entries) -> ChatLogprobs | None:
        if not self.wants_logprobs:
            return None
        content = []
        for entry in entries:
            token_id, logprob, top = entry.token_id, entry.logprob, entry.top
            token = self._token(token_id)
            content.append(
                TokenLogprob(
                    token=token,
                    logprob=logprob,
                    bytes=list(token.encode()),
                    top_logprobs=[
                        TopLogprob(
                            token=self._token(t), logprob=lp, bytes=list(self._token(t).encode())
                        )
                        for t, lp in top.items()
                    ],
                )
            )
        return ChatLogprobs(content=content)

    def response(self) -> dict:
        choices = []
        for i, c in enumerate(self.choices):
            message, reason = self._message(c)
            c.reported_reason = reason
            logprobs = self._logprobs(c.logprobs)
            choices.append(
                ChatChoice(index=i, message=message, logprobs=logprobs, finish_reason=reason)
            )
        return ChatCompletionResponse(
            id=self.id, model=self.model, choices=choices, usage=self.usage()
        ).model_dump()

    def _chunk(self, choice: ChatChunkChoice) -> str:
        chunk = ChatCompletionChunk(id=self.id, model=self.model, choices=[choice])
        return chunk.model_dump_json(exclude={"usage"})

    def chunks(self, index: int, delta: RequestDelta) -> list[str]:
        self._record(index, delta)
        out = []
        if index not in self._started:  # the first chunk of a choice names the role
            self._started.add(index)
            out.append(
                self._chunk(
                    ChatChunkChoice(index=index, delta=DeltaMessage(role="assistant", content=""))
                )
            )
        scanner = self._scanners[index]
        content, pieces = delta.new_text, []
        if scanner is not None:
            content, pieces = scanner.feed(delta.new_text)
            if delta.finished:
                content += scanner.finish()
        if content or delta.new_logprobs:
            out.append(
                self._chunk(
                    ChatChunkChoice(
                        index=index,
                        delta=DeltaMessage(content=content),
                        logprobs=self._logprobs(delta.new_logprobs or []),
                    )
                )
            )
        if pieces:
            calls = [_delta_call(piece) for piece in pieces]
            out.append(
                self._chunk(ChatChunkChoice(index=index, delta=DeltaMessage(tool_calls=calls)))
            )
        if delta.finished:
            reason = self._finish_reason(delta.finish_reason, scanner)
            self.choices[index].reported_reason = reason
            last = ChatChunkChoice(index=index, delta=DeltaMessage(), finish_reason=reason)
            out.append(self._chunk(last))
        return out

    def usage_chunk(self) -> str:
        return ChatCompletionChunk(
            id=self.id, model=self.model, choices=[], usage=self.usage()
        ).model_dump_json()


def _delta_call(piece: CallPiece) -> DeltaToolCall:
    if piece.id is not None:  # the call's first piece: id, type and name
        function = DeltaFunctionCall(name=piece.name, arguments=piece.arguments)
        return DeltaToolCall(index=piece.index, id=piece.id, type="function", function=function)
    return DeltaToolCall(index=piece.index, function=DeltaFunctionCall(arguments=piece.arguments))
