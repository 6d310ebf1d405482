"""The router's HTTP app and one engine in a single process, with no Ray: a diagnostic server.

`benchmarks.compare` serves it as `manta-1proc` beside `manta serve`, under the same load, to
tell the engine's and the router's own cost apart from what the Ray Serve data path (HTTP
proxy, ingress replica, worker replica, a Ray hop between each) adds on the same machine. It is
not a way to deploy Manta: it has no workers to route between, no restarts, no scaling.

    python -m benchmarks.one_process_server --model DIR --port P [--stream-interval-ms 50]
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator, Sequence

import uvicorn

from kvstore.index import InMemoryPrefixIndex
from kvstore.messages import GenerateRequest, RequestDelta
from router.api import ServerState, create_app
from router.frontend import Frontend
from workers.async_engine import AsyncEngine
from workers.engine import EngineConfig


class EngineBackend:
    """The router's backend protocol over an engine in this very process."""

    def __init__(self, engine: AsyncEngine, stream_interval_s: float) -> None:
        self.engine = engine
        self.stream_interval_s = stream_interval_s

    async def stream(self, request: GenerateRequest) -> AsyncIterator[RequestDelta]:
        deltas = self.engine.generate(
            request.prompt_token_ids,
            request.sampling,
            request.request_id,
            request.priority,
            block_hashes=request.block_hashes,
            interval_s=self.stream_interval_s,
        )
        async for delta in deltas:
            yield delta


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--stream-interval-ms", type=float, default=50.0)
    args = parser.parse_args(argv)
    engine = AsyncEngine(EngineConfig(model=args.model))
    frontend = Frontend(
        engine.tokenizer,
        EngineBackend(engine, args.stream_interval_ms / 1e3),
        InMemoryPrefixIndex(),
        model_name=args.model,
        model_id=args.model,
        max_model_len=engine.engine.max_model_len,
        block_size=engine.engine.config.block_size,
    )
    app = create_app(ServerState(frontend))
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        engine.shutdown()


if __name__ == "__main__":
    main()
