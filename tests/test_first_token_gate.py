"""The router's gate on requests awaiting their first token: it refuses beyond its limit (a
request alone never), grows while TTFTs meet the SLO, shrinks once per SLO period on a miss."""

from __future__ import annotations

import pytest

from router.first_token_gate import FirstTokenGate, GateClosedError


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_refuses_beyond_the_limit_but_never_a_request_alone():
    gate = FirstTokenGate(0.5, initial=2)
    gate.enter(16)  # alone: admitted whatever its fan-out
    with pytest.raises(GateClosedError) as refused:
        gate.enter(1)
    assert refused.value.args[1] >= 1.0  # a Retry-After the client can honour
    gate.leave(16, None)
    gate.enter(2)
    with pytest.raises(GateClosedError):
        gate.check()
    assert gate.waiting == 2


def test_grows_while_ttfts_meet_the_slo_and_shrinks_on_misses():
    clock = FakeClock()
    gate = FirstTokenGate(0.5, initial=8, minimum=2, maximum=10, clock=clock)
    for _ in range(8):
        gate.enter(1)
        gate.leave(1, 0.1)
    assert gate.limit == pytest.approx(9, abs=0.1)  # about one per limit's worth
    for _ in range(100):
        gate.enter(1)
        gate.leave(1, 0.1)
    assert gate.limit == 10  # capped
    gate.enter(1)
    gate.leave(1, 2.0)
    assert gate.limit == pytest.approx(7.5)
    gate.enter(1)
    gate.leave(1, 2.0)  # the same SLO period: one cut is enough
    assert gate.limit == pytest.approx(7.5)
    for _ in range(20):
        clock.now += 0.5
        gate.enter(1)
        gate.leave(1, 2.0)
    assert gate.limit == 2  # never below the floor
    gate.leave(1, None)  # a failure teaches nothing and never goes negative
    assert gate.waiting == 0 and gate.limit == 2


def test_no_slo_means_no_gate():
    gate = FirstTokenGate(None, initial=1)
    gate.enter(5)
    gate.enter(5)
    gate.leave(10, 100.0)
    assert gate.waiting == 0 and gate.limit == 1


def test_a_burst_beyond_the_gate_gets_429_with_retry_after_and_the_gate_empties(tiny_model):
    import asyncio

    import httpx

    from router.api import ServerState, create_app
    from tests.http_server import Server, engine_frontend, wait_pool_whole
    from workers.async_engine import AsyncEngine
    from workers.engine import EngineConfig

    engine = AsyncEngine(EngineConfig(model=tiny_model, num_blocks=128, max_num_seqs=4))
    state = ServerState(engine_frontend(engine), gate=FirstTokenGate(0.5, initial=2, maximum=2))
    server = Server(create_app(state))
    body = {"model": "tiny", "prompt": "tell me a story " * 20, "max_tokens": 8}

    async def burst():
        async with httpx.AsyncClient(timeout=60) as client:
            posts = [client.post(server.url + "/v1/completions", json=body) for _ in range(24)]
            return await asyncio.gather(*posts)

    try:
        replies = asyncio.run(burst())
        statuses = [r.status_code for r in replies]
        assert set(statuses) == {200, 429}, statuses
        for refused in (r for r in replies if r.status_code == 429):
            assert int(refused.headers["retry-after"]) >= 1
            assert refused.json()["error"]["code"] == "overloaded"
        assert state.gate.waiting == 0
        wait_pool_whole(engine)
        metrics = httpx.get(server.url + "/metrics").text
        assert 'manta_router_waiting_first_token{model_name="tiny"} 0.0' in metrics
        assert 'manta_router_first_token_limit{model_name="tiny"} 2.0' in metrics
    finally:
        server.stop()
        engine.shutdown()


def test_a_worker_refusal_shrinks_the_gate(tiny_model):
    import httpx

    from kvstore.messages import WorkerOverloadedError
    from router.api import ServerState, create_app
    from tests.http_server import Server, engine_frontend
    from workers.async_engine import AsyncEngine
    from workers.engine import EngineConfig

    class Refusing:
        async def stream(self, request):
            raise WorkerOverloadedError("the worker is full", 2.0)
            yield

    engine = AsyncEngine(EngineConfig(model=tiny_model, num_blocks=32, max_num_seqs=2))
    frontend = engine_frontend(engine)
    frontend.backend = Refusing()
    state = ServerState(frontend, gate=FirstTokenGate(0.5, initial=16))
    server = Server(create_app(state))
    try:
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
        reply = httpx.post(server.url + "/v1/completions", json=body)
        assert reply.status_code == 429 and reply.headers["retry-after"] == "2"
        assert state.gate.limit == 12  # cut by a quarter: the next flood stops at the router
        assert state.gate.waiting == 0
    finally:
        server.stop()
        engine.shutdown()
