"""The engine's asyncio face: many concurrent streams share one step loop on its own thread.

The step loop owns the engine (nothing else touches it); coroutines hand it commands through a
thread-safe inbox and receive their deltas on per-request asyncio queues. Leaving a stream early
(a client disconnect cancels the coroutine) aborts the request, which frees its blocks at once.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from kvstore.events import BlockStored
from kvstore.messages import RequestDelta
from kvstore.sampling_params import SamplingParams
from workers.engine import Engine, EngineConfig

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Submit:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    priority: int
    kv_payloads: list | None
    block_hashes: list[int] | None
    sink: asyncio.Queue
    loop: asyncio.AbstractEventLoop


class AsyncEngine:
    """Built from an EngineConfig, the engine is constructed on the step loop's own thread, so
    that one thread runs all of its compute: OpenMP keeps a pool of worker threads per thread
    that computes, and a second, idle pool (from loading the model on another thread) was
    measured to cost the step loop 40% of its throughput."""

    def __init__(self, config: EngineConfig | None = None, engine: Engine | None = None) -> None:
        if engine is None and config is None:
            raise ValueError("AsyncEngine needs an EngineConfig or an Engine")
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, tuple[asyncio.Queue, asyncio.AbstractEventLoop]] = {}
        self._events: collections.deque = collections.deque()  # KV events for the prefix index
        self._exports: collections.deque = collections.deque()  # block payloads to share
        self._stopped = threading.Event()
        built: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=self._run, args=(config, engine, built), name="manta-engine", daemon=True
        )
        self._thread.start()
        error = built.get()  # None once self.engine is set
        if error is not None:
            self._thread.join()
            raise error

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str | None = None,
        priority: int = 0,
        kv_payloads: list | None = None,
        block_hashes: list[int] | None = None,
        interval_s: float = 0.0,
    ) -> AsyncIterator[RequestDelta]:
        """Streams the request's deltas; raises ValueError if the engine rejects it.

        Deltas that piled up while the reader was busy are merged into one, so every hop
        after this one (Ray, the router, HTTP) handles fewer, larger messages. With
        `interval_s`, after each delta the stream waits until that long has passed before it
        takes the next (the first token is never held back): at most one message per
        interval, whatever the step rate."""
        if self._stopped.is_set():
            raise RuntimeError("the engine is shut down")
        request_id = request_id or uuid.uuid4().hex
        sink: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self._inbox.put(
            _Submit(request_id, prompt, params, priority, kv_payloads, block_hashes, sink, loop)
        )
        finished = False
        try:
            while True:
                item = await sink.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                while not item.finished and not sink.empty():
                    later = sink.get_nowait()
                    if isinstance(later, BaseException):
                        sink.put_nowait(later)  # raised on the next read, after this delta
                        break
                    item.merge(later)
                finished = item.finished
                sent = loop.time()
                yield item
                if finished:
                    return
                wait = interval_s - (loop.time() - sent)
                if wait > 0:
                    await asyncio.sleep(wait)
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def stats(self) -> dict[str, float]:
        """The engine's stats as of its last step (safe from any thread)."""
        return dict(self._stats)

    def take_events(self) -> list:
        """Block stored/removed events since the last call (safe from any thread)."""
        return _drain(self._events)

    def republish_cache(self) -> None:
        """Queue one event naming every cached block, for an index that lost them (it
        restarted empty, or dropped events while unreachable); safe from any thread."""
        self._inbox.put(("republish",))

    def take_exports(self) -> list:
        """Hot block payloads to publish to the shared block store (safe from any thread)."""
        return _drain(self._exports)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def shutdown(self) -> None:
        self._stopped.set()
        self._inbox.put(("wake", None))
        self._thread.join(timeout=10)

    # -- the step loop (engine thread) ------------------------------------------------------
    def _run(self, config: EngineConfig | None, engine: Engine | None, built) -> None:
        try:
            engine = engine or Engine(config)
        except BaseException as error:  # reported to the constructor, which raises it
            built.put(error)
            return
        self.engine: Engine = engine
        self._stats = engine.stats()
        built.put(None)
        while not self._stopped.is_set():
            block = not engine.has_unfinished()
            self._drain_inbox(block)
            if not engine.has_unfinished():
                continue
            try:
                deltas = engine.step()
            except Exception as error:  # a failed step must not take the worker down
                logger.exception("engine step failed; failing its requests")
                self._fail_all(RuntimeError(f"engine step failed: {error}"))
                continue
            self._deliver(deltas)
            self._events.extend(engine.kv.drain_events())
            self._exports.extend(engine.take_exports())
            self._stats = engine.stats()
        self._fail_all(RuntimeError("the engine was shut down"))

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                self._events.extend(self.engine.kv.drain_events())
                self._stats = self.engine.stats()
                return

    def _handle(self, item) -> None:
        if isinstance(item, _Submit):
            try:
                self.engine.add_request(
                    item.prompt,
                    item.params,
                    item.request_id,
                    item.priority,
                    item.kv_payloads,
                    item.block_hashes,
                )
            except Exception as error:
                _call_in(item.loop, item.sink.put_nowait, error)
                return
            self._sinks[item.request_id] = (item.sink, item.loop)
        elif item[0] == "abort":
            self.engine.abort_request(item[1])
            self._sinks.pop(item[1], None)
        elif item[0] == "republish":
            pool = self.engine.kv.pool
            self._events.extend(pool.drain_events())  # older than the snapshot: first
            self._events.append(BlockStored(tuple(pool.cached_hashes())))

    def _deliver(self, deltas: list[RequestDelta]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for delta in deltas:
            target = self._sinks.get(delta.request_id)
            if target is None:
                continue
            if delta.finished:
                del self._sinks[delta.request_id]
            by_loop.setdefault(target[1], []).append((target[0], delta))
        for loop, items in by_loop.items():
            if not _call_in(loop, _put_all, items):
                for _, delta in items:  # nobody is listening any more
                    self.abort(delta.request_id)

    def _fail_all(self, error: BaseException) -> None:
        for request_id, (sink, loop) in list(self._sinks.items()):
            self.engine.abort_request(request_id)
            _call_in(loop, sink.put_nowait, error)
        self._sinks.clear()


def _put_all(items: list[tuple[asyncio.Queue, RequestDelta]]) -> None:
    for sink, delta in items:
        sink.put_nowait(delta)


def _call_in(loop: asyncio.AbstractEventLoop, fn, *args) -> bool:
    """Schedule fn on the loop from this thread; False if that loop is already closed."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        return False
    return True


def _drain(items: collections.deque) -> list:
    out = []
    while items:
        out.append(items.popleft())
    return out
