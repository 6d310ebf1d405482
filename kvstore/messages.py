"""The small message types that cross the router/worker process boundary.

Both sides import them from here, so neither imports the other. They are plain dataclasses
(pickled by Ray between trusted cluster processes; nothing from clients or Redis is ever
unpickled) and a few exception types whose meaning survives the trip.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvstore.sampling_params import SamplingParams


@dataclass(slots=True)
class RoutingHint:
    """What the router computed for a prompt, read by the request router to pick a worker."""

    matched_blocks: dict[str, int]  # worker id -> leading prompt blocks it holds
    affinity_key: int  # hash of the prompt's head: the tenant, for consistent hashing
    block_size: int


@dataclass(slots=True)
class GenerateRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    priority: int = 0
    routing: RoutingHint | None = None
    # Chained hashes of the prompt's full blocks (kvstore.hashing, keyed by the model id),
    # computed once by the router; the worker's prefix cache and KV sharing reuse them.
    block_hashes: list[int] | None = None
    # When the client's request reached the router (wall clock), so that a worker's admission
    # counts the time it already waited; None: admitted whatever the SLO (a resumed stream).
    arrival_s: float | None = None
    # W3C trace context (`traceparent`, ...) of the router's span for this request, when traced.
    trace_context: dict[str, str] | None = None


@dataclass(slots=True)
class TokenLogprobs:
    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)  # most likely token ids -> logprob


@dataclass(slots=True)
class RequestDelta:
    """What one engine step added to one request: the streaming unit, from the engine's step
    through the worker deployment to the router, unchanged."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    new_logprobs: list[TokenLogprobs] | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    worker_id: str = ""  # set by the worker deployment that streamed it
    # On the finishing delta: seconds the request waited in the worker's queue, from its first
    # scheduling to its first token (prefill), and from there to its end (decode).
    queue_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    # Also on the finishing delta: prompt tokens whose KV came from the shared block store,
    # and the speculative draft tokens proposed for the request and accepted.
    num_loaded_tokens: int = 0
    num_spec_proposed: int = 0
    num_spec_accepted: int = 0

    def merge(self, later: RequestDelta) -> None:
        """Fold the next delta of the same request into this one (a slow reader then gets
        one message for several steps)."""
        self.new_token_ids = self.new_token_ids + later.new_token_ids
        self.new_text += later.new_text
        if later.new_logprobs:
            self.new_logprobs = (self.new_logprobs or []) + later.new_logprobs
        self.finished, self.finish_reason = later.finished, later.finish_reason
        self.num_output_tokens = later.num_output_tokens
        self.num_cached_tokens = later.num_cached_tokens
        self.queue_s, self.prefill_s, self.decode_s = later.queue_s, later.prefill_s, later.decode_s
        self.num_loaded_tokens = later.num_loaded_tokens
        self.num_spec_proposed, self.num_spec_accepted = (
            later.num_spec_proposed, later.num_spec_accepted)  # fmt: skip


class RequestRejectedError(ValueError):
    """The worker refused the request as invalid (becomes HTTP 400)."""


class WorkerOverloadedError(RuntimeError):
    """The worker's queue is full (becomes HTTP 429 with Retry-After)."""


class WorkerUnavailableError(RuntimeError):
    """No healthy worker could take the request (becomes HTTP 503)."""
