"""The router's work per request, independent of HTTP: tokenize once, hash the prompt's blocks,
ask the prefix index who holds them, dispatch, and retry on another worker if the chosen one
dies before emitting a token.

The tokenizer and the backend are injected (the cluster wires the workers' tokenizer and a Ray
Serve handle), so this module imports neither workers nor Ray.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from kvstore.hashing import hash_block, hash_blocks, salted_root
from kvstore.index import PrefixIndex
from kvstore.messages import GenerateRequest, RequestDelta, RoutingHint, WorkerUnavailableError
from kvstore.sampling_params import SamplingParams
from kvstore.worker_reports import Reports, WorkerReports
from router.tool_calls import default_parser

logger = logging.getLogger(__name__)


class Backend(Protocol):
    """Where requests go: the worker deployment (or, in one process, an engine)."""

    def stream(self, request: GenerateRequest) -> AsyncIterator[RequestDelta]: ...


def cache_salt(tenant: str | None, salt: str | None) -> str | None:
    """One salt from the tenant (set by the API key) and the request's own `cache_salt`: a
    client's salt can split its tenant's cache further but never reach another tenant's."""
    if tenant is None and salt is None:
        return None
    return f"{len(tenant or '')}:{tenant or ''}|{salt or ''}"


class ContextLengthError(ValueError):
    """Prompt plus max_tokens does not fit the model's context."""


class Frontend:
    def __init__(
        self,
        tokenizer: Any,
        backend: Backend,
        index: PrefixIndex,
        *,
        model_name: str,
        model_id: str,
        max_model_len: int,
        block_size: int,
        affinity_prefix_tokens: int = 64,
        max_retries: int = 2,
        max_migrations: int = 2,
        max_tokens_cap: int | None = None,
        is_worker_failure: Callable[[BaseException], bool] = lambda e: False,
        special_tokens_in_content: bool = False,
        on_recovery: Callable[[str], None] = lambda kind: None,
        reports: Reports | None = None,
        tool_call_parser: str | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.backend = backend
        self.index = index
        self.model_name = model_name
        self.hash_key = model_id.encode()
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.affinity_prefix_tokens = affinity_prefix_tokens
        self.max_retries = max_retries
        self.max_migrations = max_migrations
        self.max_tokens_cap = max_tokens_cap  # the most tokens one choice may generate
        self.is_worker_failure = is_worker_failure
        self.special_tokens_in_content = special_tokens_in_content
        self.on_recovery = on_recovery  # called with "retry" or "migration"
        self.reports = reports if reports is not None else WorkerReports()
        templates = getattr(tokenizer, "chat_template_sources", {})
        # The format `tool_choice: auto` reads calls in: the server's choice, else the one
        # the chat template teaches.
        self.tool_call_parser = tool_call_parser or default_parser("".join(templates.values()))

    # -- prompts ----------------------------------------------------------------------------
    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        vocab = self.tokenizer.vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            raise ValueError(f"prompt token ids must lie in [0, {vocab})")
        return list(prompt)

    def render_chat(self, messages: list[dict], **template_kwargs: Any) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, **template_kwargs)
        # The template already holds the special tokens (BOS included), as transformers does.
        if self.special_tokens_in_content:
            return self.tokenizer.encode(text, add_special_tokens=False)
        contents = [m["content"] for m in messages if isinstance(m.get("content"), str)]
        return self.tokenizer.encode_chat(text, contents)

    async def build_request(
        self, token_ids: list[int], sampling: dict, priority: int = 0, tenant: str | None = None
    ) -> GenerateRequest:
        """Check the prompt fits, fill max_tokens if unset, validate the sampling settings
        (ValueError naming the problem), hash the prompt's blocks once (the worker reuses the
        hashes) and attach the routing hint. The tenant and the request's `cache_salt` salt
        every hash, so tenants (and salts) never share cached KV anywhere in the cluster."""
        if not token_ids:
            raise ValueError("the prompt is empty")
        room = self.max_model_len - len(token_ids)
        max_tokens = sampling.get("max_tokens")
        if room < 1 or (max_tokens is not None and max_tokens > room):
            asked = max_tokens if max_tokens is not None else 1
            raise ContextLengthError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"you requested {len(token_ids) + asked} tokens ({len(token_ids)} in the "
                f"prompt, {asked} for the completion). Please reduce the prompt or max_tokens."
            )
        vocab = self.tokenizer.vocab_size
        if any(token >= vocab for token in sampling.get("logit_bias") or ()):
            raise ValueError(f"logit_bias names a token id outside the vocabulary (0..{vocab - 1})")
        cap = self.max_tokens_cap
        if cap is not None and max_tokens is not None and max_tokens > cap:
            raise ValueError(f"max_tokens may be at most {cap} on this server, got {max_tokens}")
        if max_tokens is None:  # vLLM's rule: what the context leaves, within the server's cap
            max_tokens = room if cap is None else min(room, cap)
        salt = cache_salt(tenant, sampling.get("cache_salt"))
        params = SamplingParams(**{**sampling, "max_tokens": max_tokens, "cache_salt": salt})
        root = salted_root(salt)
        hashes = hash_blocks(token_ids, self.block_size, self.hash_key, root)
        matched = await self.index.match(hashes) if hashes else {}
        head = token_ids[: self.affinity_prefix_tokens]
        hint = RoutingHint(
            matched_blocks=matched,
            affinity_key=hash_block(root, head, self.hash_key),
            block_size=self.block_size,
        )
        return GenerateRequest(
            uuid.uuid4().hex, token_ids, params, priority, hint, hashes, time.time()
        )

    async def worker_stats(self) -> dict[str, dict]:
        """Each live worker's last reported stats, for /metrics."""
        return await self.reports.worker_stats()

    async def index_status(self) -> dict:
        """The prefix index's backend, whether it answers, and what it holds (`manta status`)."""
        return await self.index.describe()

    # -- dispatch ---------------------------------------------------------------------------
    async def stream(self, request: GenerateRequest) -> AsyncIterator[RequestDelta]:
        """The request's deltas. A worker that dies before the first token is retried; one
        that dies mid-stream is migrated: another worker continues from the prompt plus the
        tokens already sent, and the client sees one stream (no token lost or repeated, usage
        counted once)."""
        migration = _Migration(request)
        failures = 0
        while True:
            try:
                async for delta in self.backend.stream(migration.request):
                    yield migration.adjust(delta)
                return
            except Exception as error:
                if not self.is_worker_failure(error):
                    raise
                if migration.finished:  # it died after its last delta: nothing is missing
                    return
                if not migration.can_continue():  # every token was sent, only the end is not
                    yield migration.closing_delta(self.tokenizer)
                    return
                failures += 1
                limit = self.max_migrations if migration.started else self.max_retries
                if failures > limit:
                    raise WorkerUnavailableError(f"workers kept failing: {error}") from error
                kind = "migration" if migration.started else "retry"
                logger.warning("worker failed (%s); %s on another", error, kind)
                if migration.worker_id:  # its gauges leave /metrics now
                    await self.reports.remove_worker(migration.worker_id)
                self.on_recovery(kind)
                migration.request = await self._continuation(migration)

    async def _continuation(self, migration: _Migration) -> GenerateRequest:
        """A request for the rest of the stream: the tokens already sent become prompt."""
        original = migration.original
        if not migration.started:
            # A fresh id: the dead worker may still hold the old one in an index entry. An
            # accepted request is not shed for the time a dead worker cost it.
            return dataclasses.replace(
                original, request_id=uuid.uuid4().hex, routing=None, arrival_s=None
            )
        unemitted, migration.resume_text = migration.resume_point(self.tokenizer)
        sampling = dataclasses.replace(
            original.sampling,
            resume_unemitted_tokens=unemitted,
            resumed_output_tokens=len(migration.sent_tokens),
            max_tokens=original.sampling.max_tokens - len(migration.sent_tokens),
            min_tokens=max(0, original.sampling.min_tokens - len(migration.sent_tokens)),
            # The rest of a seeded sample continues from its own seed, shifted per migration.
            seed=None
            if original.sampling.seed is None
            else original.sampling.seed + len(migration.sent_tokens),
        )
        tokens = original.prompt_token_ids + migration.sent_tokens
        root = salted_root(sampling.cache_salt)
        hashes = hash_blocks(tokens, self.block_size, self.hash_key, root)
        return GenerateRequest(uuid.uuid4().hex, tokens, sampling, original.priority, None, hashes)


class _Migration:
    """What a stream has sent so far, so that another worker can continue it seamlessly."""

    def __init__(self, request: GenerateRequest) -> None:
        self.original = self.request = request
        self.sent_tokens: list[int] = []
        self.sent_text: list[str] = []
        self.resume_text = ""  # text of sent tokens the dead worker still held back
        self.num_cached_tokens: int | None = None
        self.worker_id = ""  # who streamed the last delta
        self.finished = False

    @property
    def started(self) -> bool:
        return bool(self.sent_tokens)

    def can_continue(self) -> bool:
        room = self.original.sampling.max_tokens - len(self.sent_tokens)
        return not self.finished and room > 0

    def adjust(self, delta: RequestDelta) -> RequestDelta:
        """The delta as the client must see it: one request, one prompt, one usage."""
        if self.num_cached_tokens is None:
            self.num_cached_tokens = delta.num_cached_tokens
        self.worker_id = delta.worker_id
        if self.request is not self.original:
            delta.request_id = self.original.request_id
            delta.num_prompt_tokens = len(self.original.prompt_token_ids)
            delta.num_output_tokens += len(self._resumed_tokens)
            delta.num_cached_tokens = self.num_cached_tokens
            if self.resume_text:
                delta.new_text = self.resume_text + delta.new_text
                self.resume_text = ""
        self.sent_tokens.extend(delta.new_token_ids)
        self.sent_text.append(delta.new_text)
        self.finished = delta.finished
        return delta

    @property
    def _resumed_tokens(self) -> list[int]:
        """The sent tokens that the current request took as its prompt."""
        return self.request.prompt_token_ids[len(self.original.prompt_token_ids) :]

    def closing_delta(self, tokenizer: Any) -> RequestDelta:
        """The end of a stream whose worker died after sending its every token (by length)
        but before saying it had finished: the text still held back, and the finish."""
        original = self.original
        skip = original.sampling.skip_special_tokens
        text = tokenizer.decode(self.sent_tokens, skip_special_tokens=skip)
        self.finished = True
        return RequestDelta(
            request_id=original.request_id,
            new_token_ids=[],
            new_text=self._unseen(text),
            finished=True,
            finish_reason="length",
            num_prompt_tokens=len(original.prompt_token_ids),
            num_output_tokens=len(self.sent_tokens),
            num_cached_tokens=self.num_cached_tokens or 0,
        )

    def resume_point(self, tokenizer: Any) -> tuple[int, str]:
        """Where the client's text stands in the sent tokens: how many trailing tokens form
        an unfinished character (their text is still to come: the next worker decodes them
        with its first tokens), and the text of the rest that the client has not seen (a stop
        checker was holding it)."""
        skip = self.original.sampling.skip_special_tokens
        tokens = self.sent_tokens
        for unemitted in range(min(len(tokens), 4) + 1):  # a character is at most 4 bytes
            text = tokenizer.decode(tokens[: len(tokens) - unemitted], skip_special_tokens=skip)
            if not text.endswith("\ufffd"):
                break
        return unemitted, self._unseen(text)

    def _unseen(self, text: str) -> str:
        """What of `text`, the decoded sent tokens, the client has not been sent yet."""
        sent = "".join(self.sent_text)
        return text[len(sent) :] if text.startswith(sent) else ""
