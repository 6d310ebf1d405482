"""`manta serve --record-trace`: the server's own traffic, as a trace, over real HTTP with a
real engine: one line per engine request whose counts are the response's usage, arrival times
in order, shared system prompts as prefix groups, and never any text."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from cluster.config import ClusterConfig
from kvstore.messages import (
    GenerateRequest,
    RequestDelta,
    RequestRejectedError,
    WorkerOverloadedError,
)
from kvstore.sampling_params import SamplingParams
from kvstore.trace import FIELDS, read_trace
from router.api import ServerState, create_app
from router.auth import Authenticator, parse_api_keys
from router.recorder import TrafficRecorder
from tests.http_server import Server, engine_frontend, wait_pool_whole
from workers.async_engine import AsyncEngine
from workers.engine import EngineConfig

SYSTEM = "You are the travel desk of a railway company; answer briefly and politely. " * 6


@pytest.fixture(scope="module")
def served(tiny_model):
    engine = AsyncEngine(EngineConfig(model=tiny_model, num_blocks=256, max_num_seqs=8))
    auth = Authenticator(parse_api_keys(["key-acme-0001:acme"]))
    state = ServerState(engine_frontend(engine), auth=auth)
    server = Server(create_app(state))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="key-acme-0001", max_retries=0)
    yield client, engine, state
    server.stop()
    engine.shutdown()


@pytest.fixture
def recording(served, tmp_path):
    """(client, trace path): the server records into a fresh trace for one test."""
    client, engine, state = served
    path = tmp_path / "trace.jsonl"
    state.recorder = TrafficRecorder(path, state.frontend.block_size)
    yield client, path
    wait_pool_whole(engine)
    state.recorder.close()
    state.recorder = None


def wait_lines(path: Path, count: int, timeout_s: float = 10.0) -> list[str]:
    """The trace's lines once it has `count` (the recorder writes on a thread of its own)."""
    deadline = time.time() + timeout_s
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count or time.time() > deadline:
            assert len(lines) == count, lines
            return lines
        time.sleep(0.02)


def chat(client, question: str):
    return client.chat.completions.create(
        model="tiny",
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
        max_tokens=5,
        temperature=0,
        extra_body={"priority": 3},
    )


def test_requests_are_recorded_as_their_usage_says_and_without_text(served, recording):
    client, path = recording
    block_size = served[2].frontend.block_size
    chats = [chat(client, q) for q in ("Trains to Lyon?", "And to Nice?", "Night trains?")]
    streamed = list(client.completions.create(
        model="tiny", prompt="Timetable for Sunday", max_tokens=4, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))  # fmt: skip
    pair = client.completions.create(model="tiny", prompt="Platform 9", max_tokens=3, n=2)
    lines = wait_lines(path, 6)
    assert all(set(json.loads(line)) == set(FIELDS) for line in lines)
    trace = read_trace(path)
    arrivals = [r.arrival_s for r in trace]
    assert arrivals == sorted(arrivals) and len(set(arrivals)) == 5  # the pair arrived at once
    for record, response in zip(trace, chats, strict=False):
        assert record.prompt_tokens == response.usage.prompt_tokens
        assert record.output_tokens == response.usage.completion_tokens
        assert (record.tenant, record.priority) == ("acme", 3)
    first, second, third = trace[:3]
    assert first.prefix_group is None and first.prefix_tokens == 0
    assert second.prefix_group is not None and second.prefix_tokens > 4 * block_size
    assert second.prefix_tokens % block_size == 0
    assert third.prefix_group == second.prefix_group
    usage = streamed[-1].usage
    assert (trace[3].prompt_tokens, trace[3].output_tokens) == (
        usage.prompt_tokens, usage.completion_tokens,
    )  # fmt: skip
    choices = trace[4:]  # one line per choice: each is an engine request of its own
    assert [r.prompt_tokens for r in choices] == [pair.usage.prompt_tokens] * 2
    assert sum(r.output_tokens for r in choices) == pair.usage.completion_tokens
    raw = path.read_text()
    texts = ["railway", "Lyon", "Sunday", "Platform"]
    texts += [c.choices[0].message.content for c in chats] + [c.text for c in pair.choices]
    assert not [t for t in texts if len(t.strip()) >= 4 and t in raw]


def test_a_stream_the_client_leaves_is_recorded_with_what_it_got(recording):
    client, path = recording
    stream = client.completions.create(
        model="tiny", prompt="Count slowly", max_tokens=1500, temperature=0, stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    next(iter(stream))
    stream.close()
    (line,) = wait_lines(path, 1)
    assert 1 <= json.loads(line)["output_tokens"] < 1500


def fake_request(hashes: list[int], max_tokens: int = 7) -> GenerateRequest:
    prompt = list(range(16 * len(hashes) + 3))
    return GenerateRequest("r", prompt, SamplingParams(max_tokens=max_tokens), 0, None, hashes)


def replay(recorder: TrafficRecorder, request: GenerateRequest, error: Exception | None = None):
    """Run `request` through the recorder over a stream of two tokens, or one that raises."""

    async def stream():
        if error is not None:
            raise error
        yield RequestDelta("r", [5], "x", num_output_tokens=1)
        yield RequestDelta("r", [6], "y", finished=True, num_output_tokens=2)

    async def drain():
        with pytest.raises(type(error)) if error else contextlib.nullcontext():
            async for _ in recorder.track(stream(), request, time.monotonic(), None):
                pass

    asyncio.run(drain())


def test_refusals_count_as_offered_and_invalid_requests_do_not(tmp_path):
    recorder = TrafficRecorder(tmp_path / "t.jsonl", 16)
    replay(recorder, fake_request([1, 2, 3]))
    replay(recorder, fake_request([1, 2, 9], max_tokens=40), WorkerOverloadedError("full", 1.0))
    replay(recorder, fake_request([4]), RequestRejectedError("bad"))
    replay(recorder, fake_request([1, 5]))
    recorder.close()
    trace = read_trace(tmp_path / "t.jsonl")
    assert [(r.output_tokens, r.prefix_tokens, r.tenant) for r in trace] == [
        (2, 0, "default"), (40, 32, "default"), (2, 16, "default"),
    ]  # fmt: skip
    assert trace[1].prefix_group == trace[2].prefix_group is not None


def test_the_oldest_blocks_are_forgotten(tmp_path):
    recorder = TrafficRecorder(tmp_path / "t.jsonl", 16, max_seen_blocks=2)
    for hashes in ([1], [2, 3], [1]):
        replay(recorder, fake_request(hashes))
    recorder.close()
    assert [r.prefix_tokens for r in read_trace(tmp_path / "t.jsonl")] == [0, 0, 0]


def test_a_write_error_is_logged_once_and_ends_only_the_recording(tmp_path, caplog):
    caplog.set_level(logging.ERROR, logger="router.recorder")
    for path in ("/dev/full", tmp_path / "missing" / "t.jsonl"):
        caplog.clear()
        recorder = TrafficRecorder(path, 16)
        for _ in range(3):
            replay(recorder, fake_request([1]))
        recorder.close()
        assert len(caplog.records) == 1 and "stopped" in caplog.records[0].getMessage()


def test_the_flag_reaches_the_ingress(tiny_model, served, tmp_path):
    help_text = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "serve", "--help"],
        capture_output=True, text=True, timeout=60,
    ).stdout  # fmt: skip
    assert "--record-trace FILE" in help_text
    config = ClusterConfig(model=tiny_model, record_trace=str(tmp_path / "t.jsonl"))
    from router.ingress import serve_app  # imports Ray

    app = serve_app(served[2].frontend, config.http_settings())
    recorder = app.state.manta.recorder
    assert recorder.path == str(tmp_path / "t.jsonl")
    recorder.close()
    assert serve_app(served[2].frontend, {}).state.manta.recorder is None
