"""Per-request output handling: detokenize incrementally, apply stop conditions, build deltas."""

from __future__ import annotations

from workers.model.tokenizer import Tokenizer
from workers.outputs import RequestDelta, TokenLogprobs
from workers.request import Request, RequestStatus
from workers.stop_checker import StopChecker


class RequestOutputState:
    """Text state of one request: its detokenizer and its stop-string checker."""

    __slots__ = ("detokenizer", "stop_checker", "stop_token_ids", "check_eos")

    def __init__(self, request: Request, tokenizer: Tokenizer) -> None:
        params = request.params
        self.detokenizer = tokenizer.detokenizer(
            request.prompt_token_ids, skip_special_tokens=params.skip_special_tokens
        )
        self.stop_checker = (
            StopChecker(params.stop, params.include_stop_str_in_output) if params.stop else None
        )
        self.stop_token_ids = set(params.stop_token_ids or ())
        self.check_eos = not params.ignore_eos


def process_token(
    request: Request,
    state: RequestOutputState,
    token_id: int,
    eos_token_ids: frozenset[int],
    logprobs: TokenLogprobs | None,
) -> tuple[RequestDelta, RequestStatus | None]:
    """Append one sampled token to the request; returns its delta and a finish status if any."""
    request.token_ids.append(token_id)
    status = None
    if (state.check_eos and token_id in eos_token_ids) or token_id in state.stop_token_ids:
        status = RequestStatus.FINISHED_STOPPED
    elif request.num_output_tokens >= request.params.max_tokens:
        status = RequestStatus.FINISHED_LENGTH
    text = state.detokenizer.push(token_id)
    if status is not None:
        text += state.detokenizer.flush()  # bytes held back for a character that never came
    if state.stop_checker is not None:
        text, stopped = state.stop_checker.push(text)
        if stopped:
            status = RequestStatus.FINISHED_STOPPED
        elif status is not None:
            text += state.stop_checker.flush()
    delta = RequestDelta(
        request_id=request.request_id,
        new_token_ids=[token_id],
        new_text=text,
        finished=status is not None,
        finish_reason=status.value if status is not None else None,
        new_logprobs=[logprobs] if logprobs is not None else None,
        num_prompt_tokens=request.num_prompt_tokens,
        num_output_tokens=request.num_output_tokens,
        num_cached_tokens=request.num_cached_tokens,
    )
    return delta, status
