"""An ASGI app on a real port of 127.0.0.1, for tests that speak real HTTP to it, and the
router's frontend over an engine in this process (what such an app serves)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import uvicorn

from benchmarks.one_process_server import EngineBackend
from kvstore.index import InMemoryPrefixIndex
from router.frontend import Frontend
from workers.async_engine import AsyncEngine


class Server:
    """An app on a real port, served by uvicorn on a thread of its own."""

    def __init__(self, app) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def engine_frontend(engine: AsyncEngine, name: str = "tiny") -> Frontend:
    """A frontend serving `engine` as model `name`, with an in-process prefix index."""
    return Frontend(
        engine.tokenizer,
        EngineBackend(engine, 0.0),
        InMemoryPrefixIndex(),
        model_name=name,
        model_id=name,
        max_model_len=engine.engine.max_model_len,
        block_size=engine.engine.config.block_size,
    )


def wait_pool_whole(engine: AsyncEngine, timeout_s: float = 10.0) -> None:
    """Wait until every KV block of the engine's pool is free again (the engine frees a
    request's blocks just after its last delta); fail the test if that takes too long."""
    deadline = time.time() + timeout_s
    while engine.stats()["num_free_blocks"] != engine.stats()["num_blocks"]:
        assert time.time() < deadline, engine.stats()
        time.sleep(0.05)


@contextlib.contextmanager
def served_engine(model: str, **engine_settings):
    """(openai client, engine): an engine on `model` behind the real API on a real port."""
    import openai

    from router.api import ServerState, create_app
    from workers.engine import EngineConfig

    engine = AsyncEngine(EngineConfig(model=model, **engine_settings))
    server = Server(create_app(ServerState(engine_frontend(engine))))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
    try:
        yield client, engine
    finally:
        server.stop()
        engine.shutdown()
