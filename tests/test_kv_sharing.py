"""Shared system-prompt KV: a worker exports hot prompt blocks to Redis, another loads them
instead of recomputing, verified; loading never changes output."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from kvstore.block_store import BlockPayload, BlockStore
from kvstore.hashing import hash_blocks
from tests.redis_server import RedisServer
from workers import Engine, EngineConfig, SamplingParams
from workers.kv_transfer import LoadCostModel

SYSTEM = list(range(100, 164))  # 64 tokens: 4 full blocks of 16
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def redis_url():
    server = RedisServer()
    server.start()
    yield server.url
    server.stop()


def engine(model: str, sharing: bool = True) -> Engine:
    return Engine(
        EngineConfig(model=model, num_blocks=64, enable_kv_sharing=sharing, batching="fixed")
    )


def run(eng: Engine, prompt: list[int], payloads=None) -> list[int]:
    request = eng.add_request(prompt, GREEDY, kv_payloads=payloads)
    out: list[int] = []
    while eng.has_unfinished():
        for delta in eng.step():
            if delta.request_id == request.request_id:
                out.extend(delta.new_token_ids)
    return out


def test_hot_blocks_are_shared_through_redis_and_loaded_exactly(tiny_model, redis_url):
    source = engine(tiny_model)
    run(source, SYSTEM + [1, 2, 3])
    assert source.take_exports() == []  # seen once: not hot yet
    run(source, SYSTEM + [4, 5])
    exports = source.take_exports()
    assert [p.token_ids for p in exports] == [tuple(SYSTEM[i : i + 16]) for i in (0, 16, 32, 48)]
    assert source.stats()["kv_exported_blocks"] == 4

    store = BlockStore(redis_url, "share-test")
    prompt = SYSTEM + [7, 8, 9]
    target = engine(tiny_model)
    hashes = hash_blocks(prompt, 16, target.hash_key)  # as the router hashes the prompt

    async def roundtrip():
        assert await store.put(exports) == 4
        assert await store.put(exports) == 0  # already there
        return await store.get_many(hashes + [12345])

    fetched = asyncio.run(roundtrip())
    assert fetched[-1] is None and all(fetched[:-1])
    got = run(target, prompt, [p for p in fetched if p])
    stats = target.stats()
    assert stats["kv_imported_blocks"] == 4
    assert stats["prefix_cache_hits"] == 64  # the whole system prompt came from the store
    assert got == run(engine(tiny_model, sharing=False), prompt)
    assert stats["num_free_blocks"] == stats["num_blocks"]


def test_payloads_that_do_not_match_are_rejected(tiny_model):
    source = engine(tiny_model)
    run(source, SYSTEM + [1])
    run(source, SYSTEM + [2])
    good = source.take_exports()
    prompt = SYSTEM + [3]
    expected = run(engine(tiny_model, sharing=False), prompt)
    wrong_tokens = [dataclasses.replace(good[0], token_ids=(0,) * 16), *good[1:]]
    wrong_shape = [dataclasses.replace(good[0], shape=(1, 2, 3)), *good[1:]]
    short_data = [dataclasses.replace(good[0], data=good[0].data[:-4]), *good[1:]]
    for payloads in (wrong_tokens, wrong_shape, short_data):
        target = engine(tiny_model)
        assert run(target, prompt, payloads) == expected
        stats = target.stats()
        assert stats["kv_import_rejected"] == 1 and stats["kv_imported_blocks"] == 0


def test_store_is_capped_lru(redis_url):
    payload = BlockPayload(1, (1, 2), "float32", (2,), b"x" * 1000)
    size = len(payload.encode())
    store = BlockStore(redis_url, "cap-test", max_bytes=3 * size)

    async def main():
        for h in range(1, 6):
            await store.put([dataclasses.replace(payload, block_hash=h)])
            await asyncio.sleep(0.01)
        return await store.get_many([1, 2, 3, 4, 5])

    found = asyncio.run(main())
    assert [p is not None for p in found] == [False, False, True, True, True]
    assert found[2].block_hash == 3 and found[2].data == payload.data


def test_dead_redis_means_nothing_found_quickly():
    store = BlockStore("redis://127.0.0.1:1/0", "down", socket_timeout_s=0.2)
    payload = BlockPayload(1, (1,), "float32", (1,), b"1234")

    async def main():
        return await store.put([payload]), await store.get_many([1, 2])

    assert asyncio.run(asyncio.wait_for(main(), 2.0)) == (0, [None, None])


def test_load_cost_model_loads_only_when_cheaper():
    model = LoadCostModel()
    assert model.should_load(10**6, 64, seconds_per_token=0.001)  # nothing measured: try
    model.observe(10**6, 0.010)  # 10 ms per MB, round trip included
    assert model.should_load(10**6, 64, seconds_per_token=0.001)  # 10 ms < 64 ms
    assert not model.should_load(10**6, 4, seconds_per_token=0.001)  # 10 ms > 4 ms
