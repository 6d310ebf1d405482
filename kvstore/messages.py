"""The small message types that cross the router/worker process boundary.

Both sides import them from here, so neither imports the other. They are plain dataclasses
(pickled by Ray) and two exception types whose meaning survives the trip.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
    sampling: dict  # keyword arguments of workers' SamplingParams
    priority: int = 0
    routing: RoutingHint | None = None


@dataclass(slots=True)
class StreamDelta:
    """One step's output for one request, as streamed from a worker."""

    text: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None
    # per new token: (token id, logprob, {top token id: logprob})
    logprobs: list[tuple[int, float, dict[int, float]]] | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0
    worker_id: str = ""
    extra: dict = field(default_factory=dict)


class RequestRejectedError(ValueError):
    """The worker refused the request as invalid (becomes HTTP 400)."""


class WorkerOverloadedError(RuntimeError):
    """The worker's queue is full (becomes HTTP 429 with Retry-After)."""


class WorkerUnavailableError(RuntimeError):
    """No healthy worker could take the request (becomes HTTP 503)."""
