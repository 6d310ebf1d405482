"""A request inside one worker: its tokens, their block hashes, how far its KV is computed, and
its status. Only the scheduler changes a request (through these fields and `append_token_ids`)."""

from __future__ import annotations

import enum
from dataclasses import InitVar, dataclass, field
from typing import Any

import torch

from kvstore.hashing import extend_block_hashes, salted_root
from kvstore.sampling_params import SamplingParams


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
    grammar: Any = None  # the structured output's matcher (workers/structured_output.py)
    status: RequestStatus = RequestStatus.WAITING
    # Prompt followed by generated tokens; a preempted request recomputes all of them.
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at admission
    num_loaded_tokens: int = 0  # of those, tokens whose KV came from the shared block store
    num_spec_proposed: int = 0  # draft tokens proposed for it, and how many of them passed
    num_spec_accepted: int = 0
    num_preemptions: int = 0
    # On the scheduler's clock, for the queue / prefill / decode times in /metrics.
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    # Chained hashes of every full block of token_ids (kvstore.hashing), grown as tokens are
    # appended: the prefix cache, KV sharing and the draft model read them, never rehash.
    block_hashes: list[int] = field(default_factory=list)
    block_size: int = 16
    hash_key: bytes = b""  # the model's identity, part of every block hash
    eos_token_ids: InitVar[frozenset[int]] = frozenset()
    # Tokens that end the request when sampled: EOS (unless ignore_eos) and stop_token_ids.
    stop_token_ids: frozenset[int] = field(init=False)
    # Tokens the request may hold at most: its prompt plus all it may generate.
    max_total_tokens: int = field(init=False)
    hash_root: int = field(init=False)  # the first block's parent, from the cache salt

    def __post_init__(self, eos_token_ids: frozenset[int]) -> None:
        stop = frozenset(self.params.stop_token_ids or ())
        self.stop_token_ids = stop if self.params.ignore_eos else stop | eos_token_ids
        self.max_total_tokens = len(self.prompt_token_ids) + self.params.max_tokens
        self.hash_root = salted_root(self.params.cache_salt)
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)
        if len(self.block_hashes) > len(self.token_ids) // self.block_size:
            raise ValueError(
                f"{len(self.block_hashes)} block hashes for {len(self.token_ids)} tokens "
                f"in blocks of {self.block_size}"
            )
        extend_block_hashes(
            self.block_hashes, self.token_ids, self.block_size, self.hash_key, self.hash_root
        )

    def append_token_ids(self, token_ids: list[int]) -> RequestStatus | None:
        """Append new tokens up to the first that ends the request (a stop token, or the
        length limit), cutting `token_ids` to those; returns the finish status, if any."""
        tokens, status = self.token_ids, None
        if len(token_ids) == 1:  # plain decoding, the hot path: no loop
            token = token_ids[0]
            tokens.append(token)
            if token in self.stop_token_ids:
                status = RequestStatus.FINISHED_STOPPED
            elif len(tokens) >= self.max_total_tokens:
                status = RequestStatus.FINISHED_LENGTH
        else:
            room = self.max_total_tokens - len(tokens)
            for n, token in enumerate(token_ids, 1):
                if token in self.stop_token_ids:
                    status = RequestStatus.FINISHED_STOPPED
                elif n >= room:
                    status = RequestStatus.FINISHED_LENGTH
                else:
                    continue
                del token_ids[n:]
                break
            tokens.extend(token_ids)
        if len(tokens) >= (len(self.block_hashes) + 1) * self.block_size:  # a block filled
            extend_block_hashes(
                self.block_hashes, tokens, self.block_size, self.hash_key, self.hash_root
            )
        return status

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
    def generated_token_ids(self) -> list[int]:
        """Every token generated for the client's request: a resumed stream's too (the tail
        of its prompt), which penalties and grammars count as output."""
        return self.token_ids[len(self.prompt_token_ids) - self.params.resumed_output_tokens :]

    def sort_key(self) -> tuple[int, int]:
        return (self.priority, self.arrival_order)
