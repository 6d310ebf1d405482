"""Records the server's own traffic as a trace (kvstore/trace.py): token counts and timings of
each engine request, never text, for the simulator, the scheduling benchmark and the learned
scheduler to replay what a deployment really saw.

One line per engine request (each choice of `n`, each prompt of a batch), written when it
ends: completed, stopped, failed part-way or cancelled by the client. A request that a worker
refused (429: overloaded, or its predicted first token would miss the SLO), or that failed or
was cancelled before its first token, is part of the offered traffic and is recorded with
`output_tokens` = its `max_tokens`, what it asked for. Not recorded: requests refused before
their prompt is tokenized (401, the tenant's rate limit, the first-token gate's 429, bad
bodies), requests no worker was asked for (400, 503 before dispatch), and requests a worker
rejected as invalid (400).

`prefix_tokens` is block_size times the leading full blocks of the prompt that an earlier
request already had (the router's chained block hashes, salted per tenant and `cache_salt`,
remembered for the last `max_seen_blocks` blocks); `prefix_group` names the first block, by a
digest keyed per recording so that no one can test a guessed prompt against the file, and is
null when no block was seen before.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from kvstore.messages import GenerateRequest, RequestDelta, RequestRejectedError
from kvstore.trace import TraceRequest, TraceWriter

logger = logging.getLogger(__name__)


class TrafficRecorder:
    """Appends one trace line per ended request to `path`. Every file operation runs on one
    thread of its own, in order, so a slow disk never holds up the event loop; the first
    error (opening or writing) is logged and ends the recording, never the server."""

    def __init__(self, path: str | Path, block_size: int, max_seen_blocks: int = 100_000) -> None:
        self.path = str(path)
        self.block_size = block_size
        self.max_seen_blocks = max_seen_blocks
        self.recording = True
        self._start = time.monotonic()
        self._seen: OrderedDict[int, None] = OrderedDict()  # block hashes, least recent first
        self._group_key = os.urandom(16)
        self._writer: TraceWriter | None = None
        self._io = ThreadPoolExecutor(1, thread_name_prefix="trace-recorder")
        self._io.submit(self._open)

    def track(
        self,
        stream: AsyncIterator[RequestDelta],
        request: GenerateRequest,
        arrived: float,
        tenant: str | None,
    ) -> AsyncIterator[RequestDelta]:
        """`stream` (the deltas of `request`, which reached the router at `arrived` on the
        monotonic clock), recorded when it ends however it ends."""
        if not self.recording:
            return stream
        return self._tracked(stream, request, arrived, tenant or "default")

    async def _tracked(
        self, stream: AsyncIterator[RequestDelta], request: GenerateRequest, arrived: float,
        tenant: str,
    ) -> AsyncIterator[RequestDelta]:  # fmt: skip
        offered = self._offered(request, arrived, tenant)
        generated = 0
        try:
            async for delta in stream:
                generated = delta.num_output_tokens or generated
                yield delta
        except RequestRejectedError:
            offered = None  # invalid input, not traffic the server should have served
            raise
        finally:
            if offered is not None and self.recording:
                ended = replace(offered, output_tokens=generated) if generated else offered
                self._io.submit(self._write, ended)

    def _offered(self, request: GenerateRequest, arrived: float, tenant: str) -> TraceRequest:
        """The request as it was offered: `output_tokens` is its `max_tokens` until it ran."""
        group, prefix_tokens = self._shared_prefix(request.block_hashes or [])
        return TraceRequest(
            arrival_s=round(max(0.0, arrived - self._start), 6),
            prompt_tokens=len(request.prompt_token_ids),
            output_tokens=request.sampling.max_tokens,
            prefix_group=group,
            prefix_tokens=prefix_tokens,
            tenant=tenant,
            priority=request.priority,
        )

    def _shared_prefix(self, hashes: list[int]) -> tuple[str | None, int]:
        """(group, tokens) of the leading blocks seen before; the blocks count as seen now."""
        shared = 0
        while shared < len(hashes) and hashes[shared] in self._seen:
            shared += 1
        for block in hashes:
            self._seen[block] = None
            self._seen.move_to_end(block)
        while len(self._seen) > self.max_seen_blocks:
            self._seen.popitem(last=False)
        if not shared:
            return None, 0
        first = hashes[0].to_bytes(8, "little")
        group = hashlib.blake2b(first, key=self._group_key, digest_size=6).hexdigest()
        return group, shared * self.block_size

    def close(self) -> None:
        """Write what is queued, then close the file; requests that end later go unrecorded."""
        self.recording = False
        self._io.submit(self._close)
        self._io.shutdown(wait=True)

    # -- on the recorder's thread -----------------------------------------------------------
    def _open(self) -> None:
        try:
            self._writer = TraceWriter(self.path)
        except OSError as error:
            self._stop(error)

    def _write(self, request: TraceRequest) -> None:
        if self._writer is None:
            return
        try:
            self._writer.write(request)
        except (OSError, ValueError) as error:
            self._stop(error)

    def _stop(self, error: Exception) -> None:
        logger.error("recording the trace to %s stopped: %s", self.path, error)
        self.recording = False
        self._close()

    def _close(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            with contextlib.suppress(OSError):  # a failed last flush: it has stopped anyway
                writer.close()
