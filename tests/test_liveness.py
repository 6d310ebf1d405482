"""With no live worker the server says so at once: /health and /ready answer 503, and a request
gets 503 with the OpenAI error body instead of waiting in a queue; once a worker is back, both
health and requests recover."""

from __future__ import annotations

import httpx
import openai
import pytest

from router.api import ServerState, create_app
from tests.http_server import Server, engine_frontend
from workers.async_engine import AsyncEngine
from workers.engine import EngineConfig


class Switch:
    """The liveness probe the ingress gets from Serve, flipped by the test."""

    def __init__(self) -> None:
        self.reason: str | None = None

    async def __call__(self) -> str | None:
        return self.reason


@pytest.fixture(scope="module")
def served(tiny_model):
    engine = AsyncEngine(EngineConfig(model=tiny_model, num_blocks=64, max_num_seqs=4))
    frontend = engine_frontend(engine)
    switch = Switch()
    server = Server(create_app(ServerState(frontend, liveness=switch)))
    yield server, switch, engine
    server.stop()
    engine.shutdown()


def test_no_live_worker_is_503_everywhere_then_recovers(served):
    server, switch, engine = served
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    switch.reason = "No worker replica is running."
    for path in ("/health", "/ready"):
        response = httpx.get(server.url + path)
        assert response.status_code == 503
        assert response.json()["error"]["message"] == switch.reason
    for stream in (False, True):
        with pytest.raises(openai.APIStatusError) as caught:
            client.completions.create(model="tiny", prompt="hi", max_tokens=2, stream=stream)
        assert caught.value.status_code == 503
        error = caught.value.response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "service_unavailable"
    assert engine.stats()["num_requests_running"] == 0  # refused before any work

    switch.reason = None
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert httpx.get(server.url + "/ready").json()["model"] == "tiny"
    out = client.completions.create(model="tiny", prompt="hi", max_tokens=2)
    assert out.choices[0].finish_reason in ("length", "stop")
