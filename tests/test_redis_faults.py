"""Redis reachable but not answering (a TCP proxy that stops forwarding): the prefix index and
the block store give "nothing found" within their timeouts, never hang or raise, skip Redis
while it is down, and work again once it answers; workers then publish their caches again."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest

from benchmarks.redis_server import RedisServer
from kvstore.block_store import BlockStore
from kvstore.events import BlockStored
from kvstore.hashing import hash_blocks
from kvstore.kv_payload import BlockPayload
from kvstore.messages import GenerateRequest
from kvstore.redis_index import RedisPrefixIndex
from kvstore.sampling_params import SamplingParams
from kvstore.worker_reports import WorkerReports
from workers.deployment import Worker
from workers.engine import EngineConfig


class BlackholeProxy:
    """Forwards TCP to Redis; while `frozen`, accepts and reads but forwards nothing."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.frozen = False
        self.loop = asyncio.new_event_loop()
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        ready.wait(5)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(
            asyncio.start_server(self._client, "127.0.0.1", self.port)
        )
        ready.set()
        self.loop.run_forever()
        server.close()

    async def _client(self, reader, writer) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pump(src, dst) -> None:
            while data := await src.read(65536):
                while self.frozen:  # hold the bytes: the peer sees silence, not a close
                    await asyncio.sleep(0.01)
                dst.write(data)
                await dst.drain()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture
def proxy():
    redis = RedisServer()
    redis.start()
    proxy = BlackholeProxy(redis.port)
    proxy.redis = redis
    yield proxy
    proxy.stop()
    redis.stop()


def test_a_silent_redis_costs_bounded_time_and_recovers(proxy):
    async def main():
        index = RedisPrefixIndex(proxy.url, "faults", socket_timeout_s=0.2, retry_interval_s=0.5)
        store = BlockStore(proxy.url, "faults", socket_timeout_s=0.2, retry_interval_s=0.5)
        payload = BlockPayload.seal(b"k" * 16, 11, [1, 2], "float32", (2,), b"x" * 8)
        await index.publish("w1", [BlockStored((11, 12))])
        assert await index.match([11, 12]) == {"w1": 2}
        assert await store.put([payload]) == 1

        proxy.frozen = True
        timings = []
        for _ in range(4):
            start = time.perf_counter()
            assert await index.match([11, 12]) == {}  # load-only routing meanwhile
            assert await store.get_many([11]) == [None]
            await index.publish("w1", [BlockStored((13,))])  # dropped, not raised
            timings.append(time.perf_counter() - start)
        assert max(timings) < 1.5, timings  # each call bounded by its timeout
        assert min(timings) < 0.05, timings  # and Redis is skipped while known down

        proxy.frozen = False
        await asyncio.sleep(0.6)  # the retry interval
        deadline = time.time() + 5
        while await index.match([11, 12]) != {"w1": 2} and time.time() < deadline:
            await asyncio.sleep(0.2)
        assert await index.match([11, 12]) == {"w1": 2}
        assert (await store.get_many([11]))[0] == payload

    asyncio.run(asyncio.wait_for(main(), 30))


def test_workers_publish_their_blocks_again_when_redis_returns(tiny_model, proxy):
    """Redis restarted empty, or silent for a while (events dropped): either way the worker's
    next heartbeat learns it, and its whole cache is in the index again soon after."""

    async def main():
        index = RedisPrefixIndex(proxy.url, "resync", socket_timeout_s=0.2, retry_interval_s=0.3)
        config = EngineConfig(model=tiny_model, num_blocks=64, max_num_seqs=4)
        worker = Worker(config, "w1", index, WorkerReports(), "resync", publish_interval_s=0.05)
        reader = RedisPrefixIndex(proxy.url, "resync", socket_timeout_s=0.2, retry_interval_s=0.3)
        prompt = list(range(5, 69))  # four full blocks
        hashes = hash_blocks(prompt, 16)
        params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)

        async def index_holds_the_prompt(timeout_s: float) -> bool:
            deadline = time.time() + timeout_s
            while time.time() < deadline:
                if (await reader.match(hashes)).get("w1") == 4:
                    return True
                await asyncio.sleep(0.05)
            return False

        try:
            request = GenerateRequest("r1", prompt, params, block_hashes=hashes)
            assert [d async for d in worker.generate(request)][-1].finished
            assert await index_holds_the_prompt(5)

            proxy.redis.kill()  # gone, then back empty: no event will name these blocks again
            await asyncio.sleep(0.3)
            proxy.redis.start()
            assert await index_holds_the_prompt(5)

            proxy.frozen = True  # silent: the worker's publishes fail meanwhile
            await asyncio.sleep(0.5)
            await proxy_flush(proxy)
            proxy.frozen = False
            assert await index_holds_the_prompt(5)
        finally:
            await worker.close()
            await reader.close()

    asyncio.run(asyncio.wait_for(main(), 60))


async def proxy_flush(proxy) -> None:
    """Empty Redis behind the frozen proxy, as if it had lost what the worker published."""
    import redis.asyncio as aioredis

    direct = aioredis.Redis.from_url(proxy.redis.url)
    await direct.flushdb()
    await direct.aclose()


def test_status_tells_whether_redis_answers_now(proxy):
    """`describe` (what `manta status` shows) counts what the index holds, and says so at
    once when Redis stops answering and again when it is back."""

    async def main():
        index = RedisPrefixIndex(proxy.url, "status", socket_timeout_s=0.2, retry_interval_s=5)
        await index.publish("w1", [BlockStored((11, 12, 13))])
        await index.publish("w2", [BlockStored((11,))])
        described = await index.describe()
        assert described == {"backend": "redis", "reachable": True, "workers": 2, "entries": 4}
        proxy.frozen = True
        assert (await index.describe())["reachable"] is False
        proxy.frozen = False
        assert (await index.describe())["reachable"] is True  # not held back by the back-off

    asyncio.run(asyncio.wait_for(main(), 30))
