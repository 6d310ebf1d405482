"""The asyncio face: concurrent streams share batches; deltas add up to the offline text; a
stream left early (a client disconnect) frees its blocks."""

from __future__ import annotations

import asyncio

import pytest

from workers import LLM, EngineConfig, SamplingParams
from workers.async_engine import AsyncEngine

PROMPTS = ["Hello world", "The cat sat on", "Numbers: 1 2 3", "日本語のテキスト", "🤖 emoji 🚀"]
PARAMS = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_model):
    engine = AsyncEngine(EngineConfig(model=tiny_model, num_blocks=128, max_num_seqs=8))
    yield engine
    engine.shutdown()


async def collect(engine: AsyncEngine, prompt, params=PARAMS):
    text, tokens, last = "", [], None
    async for delta in engine.generate(prompt, params):
        text += delta.new_text
        tokens += delta.new_token_ids
        last = delta
    return text, tokens, last


def test_concurrent_streams_match_offline_output(engine, tiny_model):
    async def main():
        return await asyncio.gather(*(collect(engine, p) for p in PROMPTS * 3))

    results = asyncio.run(main())
    offline = LLM(tiny_model, num_blocks=128).generate(PROMPTS, PARAMS)
    for (text, tokens, last), expected in zip(results, offline * 3):
        assert tokens == expected.outputs[0].token_ids
        assert text == expected.outputs[0].text
        assert "\ufffd" not in text or "\ufffd" in expected.outputs[0].text
        assert last.finished and last.finish_reason == "length"
        assert last.num_prompt_tokens == len(expected.prompt_token_ids)
    stats = engine.stats()
    assert stats["num_free_blocks"] == stats["num_blocks"]


def test_leaving_a_stream_early_aborts_it(engine):
    async def main():
        params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
        stream = engine.generate("a long story", params)
        got = 0
        async for _ in stream:
            got += 1
            if got == 3:
                break
        await stream.aclose()
        # And a burst of streams cancelled mid-flight (clients hanging up).
        tasks = [asyncio.create_task(collect(engine, p, params)) for p in PROMPTS]
        await asyncio.sleep(0.3)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for _ in range(100):
            stats = engine.stats()
            if stats["num_free_blocks"] == stats["num_blocks"]:
                break
            await asyncio.sleep(0.05)
        return stats

    stats = asyncio.run(main())
    assert stats["num_free_blocks"] == stats["num_blocks"]
    assert stats["num_requests_running"] == 0


def test_rejected_request_raises_in_the_stream(engine):
    async def main():
        with pytest.raises(ValueError, match="context length"):
            await collect(engine, [5] * 10, SamplingParams(max_tokens=10**6))
        return await collect(engine, "still healthy")

    text, tokens, last = asyncio.run(main())
    assert len(tokens) == PARAMS.max_tokens and last.finished


def test_a_slow_reader_gets_merged_deltas_with_nothing_lost(engine, tiny_model):
    """A reader that sleeps between reads finds several steps' deltas waiting: it gets them
    as one (fewer messages downstream), and the whole stream still equals the offline one."""
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=1)

    async def main():
        deltas = []
        async for delta in engine.generate(PROMPTS[1], params):
            deltas.append(delta)
            await asyncio.sleep(0.05)  # several engine steps go by meanwhile
        return deltas

    deltas = asyncio.run(main())
    expected = LLM(tiny_model, num_blocks=128).generate(PROMPTS[1], params)[0].outputs[0]
    assert len(deltas) < params.max_tokens  # merged
    assert max(len(d.new_token_ids) for d in deltas) > 1
    assert [t for d in deltas for t in d.new_token_ids] == expected.token_ids
    assert "".join(d.new_text for d in deltas) == expected.text
    logprobs = [lp for d in deltas for lp in d.new_logprobs]
    assert [lp.token_id for lp in logprobs] == expected.token_ids
    assert deltas[-1].finished and deltas[-1].num_output_tokens == params.max_tokens
    assert [d.finished for d in deltas].count(True) == 1
