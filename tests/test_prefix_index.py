"""One behavioural suite for both prefix indexes, plus Redis outage and recovery."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvstore.events import BlockRemoved, BlockStored
from kvstore.hashing import hash_blocks
from kvstore.index import InMemoryPrefixIndex, PrefixIndex, make_index
from kvstore.redis_index import RedisPrefixIndex

pytestmark = pytest.mark.anyio

CHAIN = hash_blocks(list(range(128)), 16)  # 8 chained block hashes
IndexFactory = Callable[..., PrefixIndex]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class FakeClock:
    """Wall clock that only moves when a test says so."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_redis(port: int) -> subprocess.Popen:
    """Start a throwaway redis-server on `port` and wait until it answers."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (apt-get install redis-server)")
    args = ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port, socket_timeout=0.2, socket_connect_timeout=0.2)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            client.ping()
            client.close()
            return proc
        except redis.RedisError:
            time.sleep(0.02)
    proc.kill()
    raise RuntimeError(f"redis-server did not start on port {port}")


def _stop_redis(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url = os.environ.get("MANTA_TEST_REDIS_URL")
    if url:
        yield url
        return
    port = _free_port()
    proc = _start_redis(port)
    yield f"redis://127.0.0.1:{port}/0"
    _stop_redis(proc)


@pytest.fixture(params=["memory", "redis"])
async def make(request: pytest.FixtureRequest) -> AsyncIterator[IndexFactory]:
    """Factory of fresh indexes of one kind; each call gets its own namespace by default."""
    created: list[PrefixIndex] = []
    namespaces: list[str] = []
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None

    def factory(
        ttl_s: float = 30.0, clock: Callable[[], float] = time.time, namespace: str | None = None
    ) -> PrefixIndex:
        namespace = namespace or uuid.uuid4().hex
        if url is None:
            index: PrefixIndex = InMemoryPrefixIndex(ttl_s=ttl_s, clock=clock)
        else:
            # What these tests check is the index's answers: a loaded machine must not turn a
            # slow reply into the outage path (that is tests/test_redis_faults.py's).
            index = RedisPrefixIndex(url, namespace, ttl_s=ttl_s, clock=clock, socket_timeout_s=5)
            namespaces.append(namespace)
        created.append(index)
        return index

    yield factory
    for index in created:
        await index.close()
    if url is not None:
        with redis.Redis.from_url(url) as client:
            for namespace in namespaces:
                for key in client.scan_iter(match=f"manta:{namespace}:*"):
                    client.delete(key)


async def test_longest_prefix_per_worker(make: IndexFactory) -> None:
    index = make()
    await index.publish("full", [BlockStored(tuple(CHAIN))])
    await index.publish("three", [BlockStored(tuple(CHAIN[:3]))])
    await index.publish("gap", [BlockStored((CHAIN[0], CHAIN[1], CHAIN[3], CHAIN[4]))])
    await index.publish("no-root", [BlockStored(tuple(CHAIN[1:]))])
    assert await index.match(CHAIN) == {"full": 8, "three": 3, "gap": 2}
    assert await index.match(CHAIN[:2]) == {"full": 2, "three": 2, "gap": 2}
    diverging = hash_blocks(list(range(48)) + [999] * 80, 16)
    assert diverging[:3] == CHAIN[:3] and diverging[3] != CHAIN[3]
    assert await index.match(diverging) == {"full": 3, "three": 3, "gap": 2}
    assert await index.match(hash_blocks([7] * 64, 16)) == {}
    assert await index.match([]) == {}


async def test_removal_events_apply_in_order(make: IndexFactory) -> None:
    index = make()
    await index.publish("w", [BlockStored(tuple(CHAIN))])
    await index.publish("w", [BlockRemoved((CHAIN[5],))])
    assert await index.match(CHAIN) == {"w": 5}
    await index.publish("w", [BlockStored((CHAIN[5],)), BlockRemoved((CHAIN[2], CHAIN[5]))])
    assert await index.match(CHAIN) == {"w": 2}
    await index.publish("w", [BlockRemoved((CHAIN[2],)), BlockStored((CHAIN[2], CHAIN[5]))])
    assert await index.match(CHAIN) == {"w": 8}
    await index.publish("w", [BlockRemoved(()), BlockRemoved((CHAIN[0],))])
    assert await index.match(CHAIN) == {}


async def test_dead_worker_expires_and_is_cleaned(make: IndexFactory) -> None:
    clock = FakeClock()
    index = make(ttl_s=10.0, clock=clock)
    await index.publish("dead", [BlockStored(tuple(CHAIN))])
    await index.publish("alive", [BlockStored(tuple(CHAIN[:4]))])
    clock.now += 6
    await index.heartbeat("alive")
    clock.now += 6
    assert await index.match(CHAIN) == {"alive": 4}
    # A heartbeat sweeps the dead worker's blocks: beating again later does not revive them.
    await index.heartbeat("alive")
    await index.heartbeat("dead")
    assert await index.match(CHAIN) == {"alive": 4}
    await index.publish("dead", [BlockStored(tuple(CHAIN[:1]))])
    assert await index.match(CHAIN) == {"alive": 4, "dead": 1}


async def test_expired_worker_counts_again_after_heartbeat_before_sweep(
    make: IndexFactory,
) -> None:
    clock = FakeClock()
    index = make(ttl_s=10.0, clock=clock)
    await index.publish("slow", [BlockStored(tuple(CHAIN[:2]))])
    clock.now += 11
    assert await index.match(CHAIN) == {}
    await index.heartbeat("slow")
    assert await index.match(CHAIN) == {"slow": 2}


async def test_remove_worker(make: IndexFactory) -> None:
    index = make()
    await index.publish("a", [BlockStored(tuple(CHAIN))])
    await index.publish("b", [BlockStored(tuple(CHAIN[:2]))])
    await index.remove_worker("a")
    await index.remove_worker("never-seen")
    assert await index.match(CHAIN) == {"b": 2}
    await index.heartbeat("a")
    assert await index.match(CHAIN) == {"b": 2}


async def test_namespaces_are_isolated(make: IndexFactory) -> None:
    model_a, model_b = (
        make(namespace=f"a-{uuid.uuid4().hex}"),
        make(namespace=f"b-{uuid.uuid4().hex}"),
    )
    await model_a.publish("w", [BlockStored(tuple(CHAIN))])
    await model_b.publish("w", [BlockStored(tuple(CHAIN[:1]))])
    assert await model_a.match(CHAIN) == {"w": 8}
    assert await model_b.match(CHAIN) == {"w": 1}
    await model_b.remove_worker("w")
    assert await model_a.match(CHAIN) == {"w": 8}


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    holdings=st.dictionaries(
        st.sampled_from(["w0", "w1", "w2", "w3"]),
        st.sets(st.integers(0, len(CHAIN) - 1)),
        max_size=4,
    )
)
async def test_match_equals_brute_force(make: IndexFactory, holdings: dict[str, set[int]]) -> None:
    index = make()
    for worker, positions in holdings.items():
        await index.publish(worker, [BlockStored(tuple(CHAIN[i] for i in sorted(positions)))])
    expected = {}
    for worker, positions in holdings.items():
        depth = 0
        while depth in positions:
            depth += 1
        if depth:
            expected[worker] = depth
    assert await index.match(CHAIN) == expected


async def test_make_index_picks_the_backend(redis_url: str) -> None:
    assert isinstance(make_index(None, "m", 5.0), InMemoryPrefixIndex)
    index = make_index(redis_url, "m", 5.0)
    assert isinstance(index, RedisPrefixIndex)
    await index.close()


async def _assert_degrades(index: PrefixIndex) -> None:
    """Every call returns quickly and nothing raises."""
    start = time.monotonic()
    assert await index.match(CHAIN) == {}
    await index.publish("w", [BlockStored(tuple(CHAIN))])
    await index.heartbeat("w")
    await index.remove_worker("w")
    assert await index.match(CHAIN) == {}
    assert time.monotonic() - start < 1.0


async def test_redis_nothing_listening(caplog: pytest.LogCaptureFixture) -> None:
    index = RedisPrefixIndex(f"redis://127.0.0.1:{_free_port()}/0", "m", retry_interval_s=0.0)
    with caplog.at_level(logging.WARNING, logger="kvstore.redis_index"):
        await _assert_degrades(index)
        await _assert_degrades(index)
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    await index.close()


async def test_redis_that_never_answers_times_out_quickly() -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        index = RedisPrefixIndex(f"redis://127.0.0.1:{port}/0", "m")
        start = time.monotonic()
        assert await index.match(CHAIN) == {}
        assert time.monotonic() - start < 0.5
        # Backing off: later calls do not wait for the socket timeout again.
        start = time.monotonic()
        await _assert_degrades(index)
        assert time.monotonic() - start < 0.05
        await index.close()


async def test_redis_stopped_mid_run_then_back() -> None:
    port = _free_port()
    proc = _start_redis(port)
    index = RedisPrefixIndex(f"redis://127.0.0.1:{port}/0", "m", retry_interval_s=0.1)
    try:
        await index.publish("w", [BlockStored(tuple(CHAIN))])
        assert await index.match(CHAIN) == {"w": 8}
        _stop_redis(proc)
        await _assert_degrades(index)
        proc = _start_redis(port)
        deadline = time.monotonic() + 5
        while True:
            await index.publish("w", [BlockStored(tuple(CHAIN[:3]))])
            if await index.match(CHAIN) == {"w": 3} or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        assert await index.match(CHAIN) == {"w": 3}
    finally:
        await index.close()
        _stop_redis(proc)


async def test_heartbeat_says_whether_the_index_knew_the_worker(make: IndexFactory) -> None:
    index = make()
    assert await index.heartbeat("a") is False  # new to the index: publish everything
    assert await index.heartbeat("a") is True
    await index.remove_worker("a")
    assert await index.heartbeat("a") is False  # forgotten: its blocks must be told again
