"""Per-request text: incremental detokenizing and stop strings, turned into stream deltas.

The scheduler has already appended a step's tokens and applied the token-level limits (EOS,
stop token ids, length); this module only turns tokens into text, and reports the request
whose text reached one of its stop strings so the engine can finish it.
"""

from __future__ import annotations

import time

from kvstore.messages import RequestDelta, TokenLogprobs
from workers.model.tokenizer import Tokenizer
from workers.request import Request, RequestStatus
from workers.stop_checker import StopChecker


class RequestOutputState:
    """Text state of one request: its detokenizer, its stop-string checker, tokens emitted."""

    __slots__ = ("detokenizer", "stop_checker", "num_emitted")

    def __init__(self, request: Request, tokenizer: Tokenizer) -> None:
        params = request.params
        self.detokenizer = tokenizer.detokenizer(
            request.prompt_token_ids,
            skip_special_tokens=params.skip_special_tokens,
            unemitted=params.resume_unemitted_tokens,
        )
        self.stop_checker = (
            StopChecker(params.stop, params.include_stop_str_in_output) if params.stop else None
        )
        self.num_emitted = 0


def make_delta(
    request: Request,
    state: RequestOutputState,
    token_ids: list[int],
    logprobs: list[TokenLogprobs] | None,
) -> tuple[RequestDelta, bool]:
    """The delta for this step's new tokens, and whether a stop string ended the text there.

    `request.status` tells whether the scheduler finished the request; a stop string inside
    the tokens cuts them (and the text) at the token that completed it.
    """
    finished = request.status.finished
    text_parts = []
    stopped = False
    for n, token_id in enumerate(token_ids, 1):
        text = state.detokenizer.push(token_id)
        last = n == len(token_ids)
        if last and finished:
            text += state.detokenizer.flush()  # bytes held back for a character that never came
        if state.stop_checker is not None:
            text, stopped = state.stop_checker.push(text)
            if stopped:
                token_ids = token_ids[:n]
                logprobs = logprobs[:n] if logprobs else logprobs
            elif last and finished:
                text += state.stop_checker.flush()
        text_parts.append(text)
        if stopped:
            break
    state.num_emitted += len(token_ids)
    reason = RequestStatus.FINISHED_STOPPED.value if stopped else request.status.value
    delta = RequestDelta(
        request_id=request.request_id,
        new_token_ids=token_ids,
        new_text="".join(text_parts),
        finished=finished or stopped,
        finish_reason=reason if finished or stopped else None,
        new_logprobs=logprobs,
        num_prompt_tokens=request.num_prompt_tokens,
        num_output_tokens=state.num_emitted,
        num_cached_tokens=request.num_cached_tokens,
    )
    if delta.finished:
        delta.queue_s, delta.prefill_s, delta.decode_s = phase_times(request)
        delta.num_loaded_tokens = request.num_loaded_tokens
        delta.num_spec_proposed = request.num_spec_proposed
        delta.num_spec_accepted = request.num_spec_accepted
    return delta, stopped


def phase_times(request) -> tuple[float, float, float]:
    """(queue, prefill, decode) seconds of a finished request; 0 for a phase it never reached
    (a request stopped by its first token has no decode; an aborted one may have no prefill)."""
    end = request.finished_time if request.finished_time is not None else time.monotonic()
    scheduled = request.first_scheduled_time
    first = request.first_token_time
    queue = (scheduled if scheduled is not None else end) - request.arrival_time
    prefill = (first if first is not None else end) - scheduled if scheduled is not None else 0.0
    decode = end - first if first is not None else 0.0
    return max(0.0, queue), max(0.0, prefill), max(0.0, decode)
