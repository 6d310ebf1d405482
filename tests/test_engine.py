"""The engine end to end on a tiny checkpoint: batching never changes greedy output, and the
KV pool is whole again after every scenario."""

from __future__ import annotations

import random

import pytest

from workers import LLM, Engine, EngineConfig, SamplingParams

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def make_prompts(seed: int = 0) -> list[list[int]]:
    """Mixed lengths; half share a 40-token system prompt (not a multiple of the block size)."""
    rng = random.Random(seed)
    system = [rng.randrange(5, 1000) for _ in range(40)]
    prompts = []
    for i in range(8):
        own = [rng.randrange(5, 1000) for _ in range(rng.choice([1, 3, 17, 33, 60]))]
        prompts.append(system + own if i % 2 == 0 else own)
    return prompts


def make_engine(model: str, **kwargs) -> Engine:
    defaults = dict(num_blocks=256, max_num_seqs=16, max_num_batched_tokens=512, batching="fixed")
    return Engine(EngineConfig(model=model, **{**defaults, **kwargs}))


def run_all(engine: Engine, prompts, params=GREEDY) -> dict[str, list[int]]:
    ids = [engine.add_request(p, params).request_id for p in prompts]
    tokens: dict[str, list[int]] = {rid: [] for rid in ids}
    while engine.has_unfinished():
        for delta in engine.step():
            tokens[delta.request_id].extend(delta.new_token_ids)
    return [tokens[rid] for rid in ids]


def assert_pool_whole(engine: Engine) -> None:
    stats = engine.stats()
    assert stats["num_free_blocks"] == stats["num_blocks"]
    assert stats["num_requests_running"] == stats["num_requests_waiting"] == 0


@pytest.fixture(scope="module")
def alone(tiny_model):
    """Each prompt run by itself, with no cache: the reference output."""
    engine = make_engine(tiny_model, enable_prefix_caching=False)
    return [run_all(engine, [p])[0] for p in make_prompts()]


@pytest.mark.parametrize("prefix_caching", [True, False])
@pytest.mark.parametrize("token_budget", [512, 24])
def test_batched_greedy_equals_alone(tiny_model, alone, prefix_caching, token_budget):
    engine = make_engine(
        tiny_model,
        enable_prefix_caching=prefix_caching,
        max_num_batched_tokens=token_budget,
        max_num_seqs=min(16, token_budget),
    )
    assert run_all(engine, make_prompts()) == alone
    # A second pass over the same prompts is served from the prefix cache when it is on.
    assert run_all(engine, make_prompts()) == alone
    stats = engine.stats()
    assert (stats["prefix_cache_hits"] > 0) == prefix_caching
    assert_pool_whole(engine)


def test_preemption_never_changes_output(tiny_model, alone):
    # 12 blocks of 16 tokens cannot hold 8 requests of up to 100+24 tokens at once.
    engine = make_engine(tiny_model, num_blocks=12, max_num_batched_tokens=64)
    assert run_all(engine, make_prompts()) == alone
    assert engine.stats()["num_preemptions"] > 0
    assert_pool_whole(engine)


def test_adaptive_policy_gives_the_same_tokens(tiny_model, alone):
    engine = make_engine(tiny_model, batching="adaptive", max_num_batched_tokens=64)
    assert run_all(engine, make_prompts()) == alone
    assert "batching_token_budget" in engine.stats()
    assert_pool_whole(engine)


def test_shared_system_prompt_hits_the_cache(tiny_model):
    engine = make_engine(tiny_model)
    prompts = make_prompts()
    run_all(engine, [prompts[0]])
    before = engine.stats()
    run_all(engine, [prompts[2]])  # same 40-token system prompt, other suffix
    after = engine.stats()
    assert after["prefix_cache_hits"] - before["prefix_cache_hits"] == 32  # two full blocks
    assert after["prefix_cache_queries"] - before["prefix_cache_queries"] == len(prompts[2])


def test_abort_frees_blocks_at_once(tiny_model):
    engine = make_engine(tiny_model)
    request = engine.add_request(make_prompts()[0], SamplingParams(max_tokens=100))
    for _ in range(3):
        engine.step()
    assert engine.stats()["num_free_blocks"] < engine.stats()["num_blocks"]
    assert engine.abort_request(request.request_id)
    assert not engine.abort_request(request.request_id)
    assert_pool_whole(engine)
    assert not engine.has_unfinished()


def test_stop_string_and_stop_token(tiny_model):
    llm = LLM(tiny_model, num_blocks=64)
    prompt = make_prompts()[1]
    free = llm.generate(prompt, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    text, tokens = free[0].outputs[0].text, free[0].outputs[0].token_ids
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert len(stop) == 3
    out = llm.generate(prompt, SamplingParams(max_tokens=24, temperature=0, stop=[stop]))[0]
    assert out.outputs[0].finish_reason == "stop"
    assert out.outputs[0].text == text[: text.index(stop)]
    out = llm.generate(
        prompt, SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[tokens[5]])
    )[0]
    assert out.outputs[0].token_ids == tokens[: tokens.index(tokens[5]) + 1]
    assert out.outputs[0].finish_reason == "stop"
    assert free[0].outputs[0].finish_reason == "length"
    stats = llm.stats()
    assert stats["num_free_blocks"] == stats["num_blocks"]


def test_requests_that_can_never_fit_are_rejected(tiny_model):
    engine = make_engine(tiny_model, num_blocks=8, max_model_len=256)
    with pytest.raises(ValueError, match="context length of 256"):
        engine.add_request([5] * 250, SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="whole KV cache"):
        engine.add_request([5] * 100, SamplingParams(max_tokens=100))
    with pytest.raises(ValueError, match="not in the vocabulary"):
        engine.add_request([5, 10**6], SamplingParams())
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([], SamplingParams())
    # The engine is healthy afterwards.
    assert len(run_all(engine, [[5, 6, 7]])[0]) == GREEDY.max_tokens
    assert_pool_whole(engine)


def test_seeded_sampling_is_reproducible_in_any_batch(tiny_model):
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=1234)
    prompts = make_prompts()
    engine = make_engine(tiny_model)
    alone = run_all(engine, [prompts[3]], params)[0]
    crowd = [SamplingParams(max_tokens=16, temperature=0.8) for _ in prompts]
    ids = [engine.add_request(p, c).request_id for p, c in zip(prompts, crowd)]
    seeded = engine.add_request(prompts[3], params).request_id
    got = []
    while engine.has_unfinished():
        for delta in engine.step():
            if delta.request_id == seeded:
                got.extend(delta.new_token_ids)
    assert got == alone
    assert ids  # the crowd really ran beside it
    unseeded = [run_all(engine, [prompts[3]], SamplingParams(max_tokens=16))[0] for _ in "ab"]
    assert unseeded[0] != unseeded[1]
    assert_pool_whole(engine)


def test_llm_offline_api(tiny_model):
    llm = LLM(model=tiny_model, dtype="float32", block_size=16, seed=0, num_blocks=128)
    outs = llm.generate(
        ["The quick brown fox", [1, 2, 3]],
        SamplingParams(max_tokens=8, temperature=0.0, logprobs=2, n=1),
    )
    assert [len(o.outputs[0].token_ids) <= 8 for o in outs] == [True, True]
    assert outs[0].prompt_token_ids == llm.tokenizer.encode("The quick brown fox")
    assert outs[1].prompt_token_ids == [1, 2, 3]
    first = outs[0].outputs[0]
    assert first.text == llm.tokenizer.decode(first.token_ids)
    assert len(first.logprobs) == len(first.token_ids)
    assert all(len(lp.top) == 2 and lp.logprob <= 0 for lp in first.logprobs)
    assert first.logprobs[0].token_id == first.token_ids[0]
    several = llm.generate("hello", SamplingParams(max_tokens=4, n=3, seed=7))[0]
    assert [o.index for o in several.outputs] == [0, 1, 2]
    stats = llm.stats()
    assert stats["num_free_blocks"] == stats["num_blocks"]


def test_a_request_that_ends_at_its_first_token_still_caches_its_prompt(tiny_model):
    engine = make_engine(tiny_model)
    prompt = list(range(5, 69))  # four full blocks
    for suffix in ([1, 2], [3, 4]):
        engine.add_request(prompt + suffix, SamplingParams(max_tokens=1))
        while engine.has_unfinished():
            engine.step()
    assert engine.stats()["prefix_cache_hits"] == 64
    assert_pool_whole(engine)
