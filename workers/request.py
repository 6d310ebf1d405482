"""A request inside one worker: its tokens, how far its KV is computed, and its status."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from workers.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self not in (RequestStatus.WAITING, RequestStatus.RUNNING)


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    priority: int = 0  # lower runs first; ties go to the earlier arrival
    arrival_order: int = 0  # set by the scheduler; breaks priority ties first-come first-served
    generator: torch.Generator | None = None
    status: RequestStatus = RequestStatus.WAITING
    # Prompt followed by generated tokens; a preempted request recomputes all of them.
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at admission
    num_preemptions: int = 0
    spec_k: int = 0  # draft tokens to verify in the next step (set by speculative decoding)

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def max_total_tokens(self) -> int:
        """Tokens the request may hold at most: its prompt plus all it may generate."""
        return self.num_prompt_tokens + self.params.max_tokens

    def sort_key(self) -> tuple[int, int]:
        return (self.priority, self.arrival_order)
