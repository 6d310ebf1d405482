"""What the engine hands back: per-step deltas while streaming, whole results offline."""

from __future__ import annotations

from dataclasses import dataclass

from kvstore.messages import RequestDelta, TokenLogprobs

__all__ = ["CompletionOutput", "RequestDelta", "RequestOutput", "TokenLogprobs"]


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[TokenLogprobs] | None = None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0
    finished: bool = True
