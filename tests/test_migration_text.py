"""A stream moved to another worker after any of its first tokens ends with exactly the text
an uninterrupted run gives, even when the move falls inside a character whose bytes span
several tokens (the random tiny model writes many of those)."""

from __future__ import annotations

import asyncio

import pytest

from benchmarks.one_process_server import EngineBackend
from kvstore.index import InMemoryPrefixIndex
from router.frontend import Frontend
from workers.async_engine import AsyncEngine
from workers.engine import EngineConfig

MAX_TOKENS = 24


class WorkerDied(Exception):
    pass


class DiesAfter(EngineBackend):
    """Streams the first `deltas` deltas of the first request, then its worker "dies"."""

    def __init__(self, engine: AsyncEngine, deltas: int) -> None:
        super().__init__(engine, 0.0)
        self.deltas_left = deltas

    async def stream(self, request):
        died, self.deltas_left = self.deltas_left, None
        async for delta in super().stream(request):
            if died is not None and died == 0:
                raise WorkerDied("killed")
            if died is not None:
                died -= 1
            yield delta


@pytest.fixture(scope="module")
def engine(tiny_model):
    engine = AsyncEngine(EngineConfig(model=tiny_model, num_blocks=128, max_num_seqs=4))
    yield engine
    engine.shutdown()


def frontend(engine: AsyncEngine, backend) -> Frontend:
    return Frontend(
        engine.tokenizer, backend, InMemoryPrefixIndex(), model_name="tiny", model_id="tiny",
        max_model_len=engine.engine.max_model_len, block_size=16,
        is_worker_failure=lambda e: isinstance(e, WorkerDied),
    )  # fmt: skip


async def text_of(front: Frontend, prompt: list[int]) -> tuple[str, int]:
    sampling = {"max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True}
    request = await front.build_request(prompt, sampling)
    text, tokens = [], 0
    async for delta in front.stream(request):
        text.append(delta.new_text)
        tokens = delta.num_output_tokens
    return "".join(text), tokens


def test_text_survives_a_move_after_every_token(engine):
    prompts = [[(7 * i + 3 * t) % 1000 + 4 for t in range(12)] for i in range(4)]

    async def main():
        for prompt in prompts:
            want, _ = await text_of(frontend(engine, EngineBackend(engine, 0.0)), prompt)
            for after in range(1, 9):
                got, tokens = await text_of(frontend(engine, DiesAfter(engine, after)), prompt)
                assert (got, tokens) == (want, MAX_TOKENS), (prompt, after)

    asyncio.run(main())


class DiesAtTheEnd(EngineBackend):
    """Streams every token; then the worker dies, either after its last delta (`after_last`)
    or just before it could say it had finished (that delta's text still held back)."""

    def __init__(self, engine: AsyncEngine, after_last: bool) -> None:
        super().__init__(engine, 0.0)
        self.after_last = after_last

    async def stream(self, request):
        async for delta in super().stream(request):
            if delta.finished and not self.after_last:
                delta.finished, delta.finish_reason, delta.new_text = False, None, ""
                yield delta
                raise WorkerDied("killed before the end")
            yield delta
        raise WorkerDied("killed after the end")


def test_a_worker_dying_at_the_very_end_costs_nothing(engine):
    prompt = [(5 * t) % 1000 + 4 for t in range(12)]

    async def main():
        want, _ = await text_of(frontend(engine, EngineBackend(engine, 0.0)), prompt)
        for after_last in (True, False):
            front = frontend(engine, DiesAtTheEnd(engine, after_last))
            sampling = {"max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True}
            deltas = [d async for d in front.stream(await front.build_request(prompt, sampling))]
            assert "".join(d.new_text for d in deltas) == want
            assert deltas[-1].finished and deltas[-1].finish_reason == "length"
            assert deltas[-1].num_output_tokens == MAX_TOKENS

    asyncio.run(main())


def test_a_moved_stream_keeps_its_grammar_and_its_penalties(engine):
    """The next worker's grammar and penalties start from the tokens already sent."""
    import json
    import re

    prompt = [(11 * t) % 1000 + 4 for t in range(12)]
    schema = {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[a-z]{8}$"}},
              "required": ["code"], "additionalProperties": False}  # fmt: skip
    sampling = {"max_tokens": 40, "temperature": 0.0, "frequency_penalty": 1.5,
                "structured_output": ("json", json.dumps(schema))}  # fmt: skip

    async def run(backend) -> str:
        front = frontend(engine, backend)
        deltas = [d async for d in front.stream(await front.build_request(prompt, sampling))]
        return "".join(d.new_text for d in deltas)

    async def main():
        want = await run(EngineBackend(engine, 0.0))
        assert re.fullmatch(r'\{"code": ?"[a-z]{8}"\}', want), want
        for after in (1, 3, 6):
            assert await run(DiesAfter(engine, after)) == want

    asyncio.run(main())
