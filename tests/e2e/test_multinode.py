"""Two Ray nodes on one machine, as a cluster of two would be: `ray start --head`, a second node
joined to it with a custom resource of its own, and `manta serve` joining them with a worker
on each. Then the second node's raylet is killed while requests stream: the lost worker comes
back on the head, and every accepted request still gets its whole, unaltered completion (those
without a first token yet are retried, those under way continue on the other worker).

Only the processes this test started are stopped: `ray stop` would take every Ray on the
machine with it."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from benchmarks.redis_server import free_port
from workers import LLM, SamplingParams

RAY = [sys.executable, "-m", "ray.scripts.scripts"]  # the `ray` command of this Python
SLOT = "manta_worker_slot"  # both nodes may hold workers: the head two, the second node one
PROMPTS = [f"Ticket {i} was filed because" for i in range(12)]
MAX_TOKENS = 96
# The GCS declares a node dead after this many missed health checks, one every 500 ms (not
# the default 5 x 3 s): the lost worker's replacement is scheduled within seconds.
FAST_HEALTH_CHECKS = {
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "500",
    "RAY_health_check_failure_threshold": "3",
}


class RayNode:
    """One `ray start` node, every process of which this test can find and stop: they all
    carry its temporary directory (or, for the head's client server, its GCS port) on their
    command line, or descend from one that does."""

    def __init__(self, name: str, cpus: int, resources: dict[str, float], head: str | None):
        # A short directory: Ray's socket paths under it must fit a Unix socket name.
        self.temp_dir = tempfile.mkdtemp(prefix=f"manta-{name}-", dir="/tmp")
        self.gcs_port = None if head else free_port()
        args = [*RAY, "start", "--disable-usage-stats", f"--temp-dir={self.temp_dir}",
                f"--num-cpus={cpus}", f"--resources={json.dumps(resources)}"]  # fmt: skip
        for flag in ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
                     "dashboard-agent-grpc-port", "runtime-env-agent-port",
                     "metrics-export-port"):  # fmt: skip
            args.append(f"--{flag}={free_port()}")  # not the fixed defaults both nodes share
        if head is None:
            args += ["--head", f"--port={self.gcs_port}", "--include-dashboard=false",
                     f"--dashboard-port={free_port()}",
                     f"--ray-client-server-port={free_port()}"]  # fmt: skip
        else:
            args.append(f"--address={head}")
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", **FAST_HEALTH_CHECKS}
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        self.raylet = next(p for p in self._own() if p.name() == "raylet")
        self.node_id = next(
            arg.split("=", 1)[1] for arg in self.raylet.cmdline() if arg.startswith("--node_id=")
        )
        self.processes = self.all_processes()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    def _own(self) -> list[psutil.Process]:
        marks = [self.temp_dir] + ([f":{self.gcs_port}"] if self.gcs_port else [])
        found = []
        for process in psutil.process_iter(["cmdline"]):
            line = " ".join(process.info["cmdline"] or [])
            if any(mark in line for mark in marks) and "pytest" not in line:
                found.append(process)
        return found

    def all_processes(self) -> set[psutil.Process]:
        found = set(self._own())
        for process in list(found):
            with _gone_is_fine():
                found.update(process.children(recursive=True))
        return found

    def kill(self, only_raylet: bool = False) -> None:
        self.processes |= self.all_processes()  # the workers it has started since
        for process in [self.raylet] if only_raylet else self.processes:
            with _gone_is_fine():
                process.kill()

    def alive(self) -> list[psutil.Process]:
        return [p for p in self.processes if p.is_running() and p.status() != "zombie"]


class _gone_is_fine:
    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        return kind is not None and issubclass(kind, psutil.NoSuchProcess)


@pytest.fixture(scope="module")
def cluster(tiny_model):
    """The two nodes and `manta serve` on them; everything stopped afterwards."""
    nodes: list[RayNode] = []
    server = log = None
    try:
        nodes.append(RayNode("head", cpus=2, resources={SLOT: 2}, head=None))
        head = nodes[0]
        nodes.append(RayNode("node2", cpus=1, resources={SLOT: 1, "second_node": 1},
                             head=head.address))  # fmt: skip
        port = free_port()
        log = open(Path(head.temp_dir) / "manta-serve.log", "w+")
        server = subprocess.Popen(
            [sys.executable, "-m", "cluster.cli", "serve", "--model", tiny_model,
             "--served-model-name", "tiny-multinode", "--workers", "2",
             "--cpus-per-worker", "0.5", "--worker-resources", json.dumps({SLOT: 1}),
             "--proxy-location", "HeadOnly", "--port", str(port), "--kv-cache-mb", "8",
             "--max-num-seqs", "2", "--slo-ttft-s", "0"],  # most requests queue at a worker
            env={**os.environ, "RAY_ADDRESS": head.address, "RAY_AUTH_MODE": "disabled"},
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        base_url = f"http://127.0.0.1:{port}"
        yield base_url, head, nodes[1], server
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)  # drains Serve, as a user's Ctrl-C does
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
        if log is not None:  # shown by pytest if the test failed
            log.seek(0)
            print("manta serve's output, its end:\n" + log.read()[-6000:])
            log.close()
        for node in reversed(nodes):
            node.kill()
        deadline = time.monotonic() + 20
        while any(node.alive() for node in nodes) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [p.pid for node in nodes for p in node.alive()]
        for node in nodes:
            shutil.rmtree(node.temp_dir, ignore_errors=True)
        assert not left, f"processes of the test's Ray nodes still running: {left}"


def workers(base_url: str) -> list[dict]:
    try:
        return httpx.get(base_url + "/status", timeout=5).json()["workers"]
    except (httpx.HTTPError, ValueError, KeyError):
        return []  # not up yet


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_lost_node_loses_no_accepted_request(cluster, tiny_model):
    base_url, head, second, server = cluster
    both = {head.node_id, second.node_id}
    wait_for(lambda: {w["node_id"] for w in workers(base_url)} == both, 180, "a worker per node")
    expected = [
        out.outputs[0].text
        for out in LLM(tiny_model).generate(
            PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
        )
    ]
    client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0, timeout=120)
    first_token_at: dict[int, float] = {}

    async def stream(i: int) -> tuple[str, int | None]:
        chunks = await client.completions.create(
            model="tiny-multinode", prompt=PROMPTS[i], max_tokens=MAX_TOKENS, temperature=0,
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )  # fmt: skip
        text, usage = [], None
        async for chunk in chunks:
            if chunk.choices and chunk.choices[0].text:
                first_token_at.setdefault(i, time.monotonic())
                text.append(chunk.choices[0].text)
            if chunk.usage:
                usage = chunk.usage.completion_tokens
        return "".join(text), usage

    def second_node_queues() -> bool:
        return any(w["node_id"] == second.node_id and w["waiting"] > 0 for w in workers(base_url))

    async def run() -> tuple[list, float]:
        tasks = [asyncio.create_task(stream(i)) for i in range(len(PROMPTS))]
        for _ in range(400):  # the kill comes while the second node's worker queues requests
            if await asyncio.to_thread(second_node_queues):
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the second node's worker never held a request")
        killed_at = time.monotonic()
        second.kill(only_raylet=True)
        return await asyncio.gather(*tasks, return_exceptions=True), killed_at

    results, killed_at = asyncio.run(run())
    for i, result in enumerate(results):
        assert not isinstance(result, BaseException), f"request {i} was lost: {result!r}"
        text, usage = result
        assert (text, usage) == (expected[i], MAX_TOKENS), f"request {i} came back altered"
    not_started = [i for i in range(len(PROMPTS)) if first_token_at[i] >= killed_at]
    assert not_started, "every request had streamed before the kill: the test proved nothing"
    assert not second.alive() or all(p.pid != second.raylet.pid for p in second.alive())

    # The lost worker comes back on the head; the app serves on, its KV pools whole.
    wait_for(
        lambda: [w["node_id"] for w in workers(base_url)] == [head.node_id] * 2,
        120,
        "both workers on the head",
    )
    out = httpx.post(base_url + "/v1/completions", timeout=60, json={
        "model": "tiny-multinode", "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS,
        "temperature": 0, "ignore_eos": True})  # fmt: skip
    assert out.status_code == 200 and out.json()["choices"][0]["text"] == expected[0]
    wait_for(lambda: all(w["kv_usage"] == 0 for w in workers(base_url)), 30, "the KV pools whole")
    assert server.poll() is None, "manta serve exited"
