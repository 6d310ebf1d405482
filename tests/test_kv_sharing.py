"""Shared system-prompt KV: a worker exports hot prompt blocks to Redis, another loads them
instead of recomputing, only if their MAC verifies; no forged or corrupt payload ever changes
an output or reaches a client as an error."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest
import torch

from benchmarks.redis_server import RedisServer
from kvstore.block_store import BlockPayload, BlockStore
from kvstore.hashing import hash_blocks
from workers import Engine, EngineConfig, SamplingParams
from workers.kv_transfer import LoadCostModel

SYSTEM = list(range(100, 164))  # 64 tokens: 4 full blocks of 16
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
SECRET = "cluster-secret-for-tests"


@pytest.fixture(scope="module")
def redis_url():
    server = RedisServer()
    server.start()
    yield server.url
    server.stop()


def engine(model: str, sharing: bool = True, secret: str = SECRET) -> Engine:
    return Engine(
        EngineConfig(
            model=model,
            num_blocks=64,
            enable_kv_sharing=sharing,
            kv_store_secret=secret,
            batching="fixed",
        )
    )


def run(eng: Engine, prompt: list[int], payloads=None) -> list[int]:
    return run_to_end(eng, prompt, payloads)[0]


def run_to_end(eng: Engine, prompt: list[int], payloads=None):
    """The request's tokens and its finishing delta."""
    request = eng.add_request(prompt, GREEDY, kv_payloads=payloads)
    out, final = [], None
    while eng.has_unfinished():
        for delta in eng.step():
            if delta.request_id == request.request_id:
                out.extend(delta.new_token_ids)
                final = delta if delta.finished else final
    return out, final


def test_hot_blocks_are_shared_through_redis_and_loaded_exactly(tiny_model, redis_url):
    source = engine(tiny_model)
    run(source, SYSTEM + [1, 2, 3])
    assert source.take_exports() == []  # seen once: not hot yet
    run(source, SYSTEM + [4, 5])
    exports = source.take_exports()
    blocks = [SYSTEM[i : i + 16] for i in (0, 16, 32, 48)]
    hashes = hash_blocks(SYSTEM, 16, source.hash_key)
    assert [p.block_hash for p in exports] == hashes
    assert all(p.verify(SECRET.encode(), h, b) for p, h, b in zip(exports, hashes, blocks))
    assert source.stats()["kv_exported_blocks"] == 4
    # What the store holds names no token: the MAC is all that is derived from them.
    header = json.loads(exports[0].encode().partition(b"\n")[0])
    assert set(header) == {"hash", "dtype", "shape", "mac"}

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
    got, final = run_to_end(target, prompt, [p for p in fetched if p])
    assert final.num_loaded_tokens == 64 <= final.num_cached_tokens  # what its span reports
    stats = target.stats()
    assert stats["kv_imported_blocks"] == 4
    assert stats["prefix_cache_hits"] == 64  # the whole system prompt came from the store
    assert got == run(engine(tiny_model, sharing=False), prompt)
    assert stats["num_free_blocks"] == stats["num_blocks"]


def forgeries(good: list[BlockPayload], other: list[BlockPayload]) -> dict[str, list]:
    """Ways to tamper with the first block while keeping its length and its header."""
    first = good[0]
    nan = torch.full((len(first.data) // 4,), float("nan")).numpy().tobytes()
    junk = torch.randint(0, 256, (len(first.data),), dtype=torch.uint8).numpy().tobytes()
    forged = {
        "random bytes": dataclasses.replace(first, data=junk),
        "NaN bytes": dataclasses.replace(first, data=nan),
        "another prompt's valid block": dataclasses.replace(other[0], block_hash=first.block_hash),
        "wrong shape": dataclasses.replace(first, shape=(1, 2, 3)),
        "short data": dataclasses.replace(first, data=first.data[:-4]),
        "MAC of another secret": BlockPayload.seal(
            b"not-the-cluster-secret", first.block_hash, SYSTEM[:16], first.dtype,
            first.shape, junk,
        ),
    }  # fmt: skip
    return {name: [payload, *good[1:]] for name, payload in forged.items()}


def test_forged_payloads_are_rejected_and_outputs_unchanged(tiny_model):
    source = engine(tiny_model)
    run(source, SYSTEM + [1])
    run(source, SYSTEM + [2])
    good = source.take_exports()
    other_prompt = list(range(300, 364))
    run(source, other_prompt + [1])
    run(source, other_prompt + [2])
    other = source.take_exports()
    prompt = SYSTEM + [3]
    expected = run(engine(tiny_model, sharing=False), prompt)
    for name, payloads in forgeries(good, other).items():
        target = engine(tiny_model)
        assert run(target, prompt, payloads) == expected, name
        stats = target.stats()
        assert stats["kv_import_rejected"] == 1 and stats["kv_imported_blocks"] == 0, name
        assert stats["num_free_blocks"] == stats["num_blocks"]


def test_kv_sharing_needs_a_secret(tiny_model):
    with pytest.raises(ValueError, match="kv_store_secret"):
        engine(tiny_model, secret=None)
    with pytest.raises(ValueError, match="at least 16 bytes"):
        engine(tiny_model, secret="short")


def test_corrupt_store_entries_are_misses(redis_url):
    store = BlockStore(redis_url, "corrupt-test")
    good = BlockPayload.seal(b"k" * 16, 7, [1, 2], "float32", (2,), b"x" * 8)

    async def main():
        await store.put([good])
        raw = store._redis
        await raw.set(store._key(8), b"{not json\n" + b"x" * 8)
        await raw.set(store._key(9), b'{"hash": 9, "dtype": 1, "shape": "ab", "mac": "zz"}\nxx')
        await raw.set(store._key(10), b"no header at all")
        return await store.get_many([7, 8, 9, 10])

    found = asyncio.run(main())
    assert found[0] == good
    assert found[1:] == [None, None, None]
    assert store.num_corrupt == 3


def test_store_is_capped_lru(redis_url):
    payload = BlockPayload.seal(b"k" * 16, 1, [1, 2], "float32", (2,), b"x" * 1000)
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
    payload = BlockPayload.seal(b"k" * 16, 1, [1], "float32", (1,), b"1234")

    async def main():
        return await store.put([payload]), await store.get_many([1, 2])

    assert asyncio.run(asyncio.wait_for(main(), 2.0)) == (0, [None, None])


def test_load_cost_model_loads_only_when_cheaper():
    model = LoadCostModel()
    assert model.should_load(10**6, 64, seconds_per_token=0.001)  # nothing measured: try
    model.observe(10**6, 0.010)  # 10 ms per MB, round trip included
    assert model.should_load(10**6, 64, seconds_per_token=0.001)  # 10 ms < 64 ms
    assert not model.should_load(10**6, 4, seconds_per_token=0.001)  # 10 ms > 4 ms
