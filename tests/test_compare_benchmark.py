"""The peer comparison (`benchmarks/compare.py`): its SLO and ratio arithmetic on hand-built
numbers, its reports, the load generator against a real `manta serve`, and the offline path
with Manta and `transformers` on a tiny checkpoint (vLLM is not installed here)."""

from __future__ import annotations

import json
import math
import signal

import httpx
import psutil
import pytest

from benchmarks.compare import main, parse_systems
from benchmarks.compare_procs import cpu_between, free_port, start_server, stop_server
from benchmarks.compare_report import (
    Table,
    markdown,
    offline_ratios,
    served_ratios,
    write_plot,
)
from benchmarks.compare_served import poisson_requests, server_command, server_env
from benchmarks.loadgen import LoadRun, RequestResult, Slo, pct, run_load, summarize


def streamed(ttft: float, tpot: float, tokens: int, chunks: int | None = None) -> RequestResult:
    """A successful request whose ``tokens`` tokens came ``tpot`` apart after ``ttft``."""
    result = RequestResult(0.0, tokens, ttft_s=ttft, completion_tokens=tokens)
    result.e2e_s = ttft + tpot * (tokens - 1)
    result.chunk_times_s = [ttft + tpot * i for i in range(chunks or tokens)]
    return result


# -- accounting --------------------------------------------------------------------------------
def test_goodput_counts_requests_within_both_slo_bounds():
    good = streamed(0.5, 0.05, 48)
    slow_first = streamed(1.5, 0.05, 48)
    slow_tokens = streamed(0.2, 0.2, 48)
    failed = RequestResult(0.0, 48, error="http 429: overloaded")
    one_token = streamed(0.9, 0.0, 1)  # no ITL to judge: only its TTFT counts
    run = LoadRun([good, slow_first, slow_tokens, failed, one_token], duration_s=10.0)
    stats = summarize(run, Slo(ttft_s=1.0, tpot_s=0.1))
    assert good.tpot_s == pytest.approx(0.05) and math.isnan(one_token.tpot_s)
    assert stats["goodput_rps"] == pytest.approx(0.2)  # good and one_token, over 10 s
    assert stats["slo_attainment"] == pytest.approx(2 / 5)
    assert stats["errors"] == 1 and stats["error_kinds"] == {"http 429": 1}
    assert stats["succeeded"] == 4 and stats["output_tokens"] == 3 * 48 + 1
    assert stats["output_tokens_per_s"] == pytest.approx(14.5)
    # Latencies are over the four successes; TPOT of the one-token request is left out.
    assert stats["ttft_p50_s"] == pytest.approx(0.7)
    assert stats["tpot_p50_s"] == pytest.approx(0.05)
    assert stats["e2e_p99_s"] == pytest.approx(pct([2.85, 3.85, 9.6, 0.9], 99))
    assert stats["chunk_itl_p50_s"] == pytest.approx(0.05)


def test_percentiles_interpolate_and_skip_missing_values():
    assert pct([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert pct([0.2, 0.5, 1.5], 99) == pytest.approx(0.5 + 0.98 * 1.0)
    assert pct([1.0, math.nan, 3.0], 50) == pytest.approx(2.0)
    assert math.isnan(pct([], 99)) and math.isnan(pct([math.nan], 50))


def test_chunk_gaps_are_between_chunks_not_tokens():
    result = streamed(0.3, 0.02, 48, chunks=3)  # 48 tokens arrived in 3 chunks
    assert result.chunk_gaps_s() == pytest.approx([0.02, 0.02])
    assert result.tpot_s == pytest.approx(0.02)


def test_offline_ratios_take_vllms_better_mode_for_each_metric():
    offline = {
        "manta": {"tokens_per_s": 900.0, "cpu_s_per_token": 0.002},
        "vllm-eager": {"tokens_per_s": 600.0, "cpu_s_per_token": 0.003},
        "vllm-compiled": {"tokens_per_s": 750.0, "cpu_s_per_token": 0.0035},
        "transformers": {"tokens_per_s": 300.0, "cpu_s_per_token": 0.008},
    }
    ratios = offline_ratios(offline)
    assert ratios["vllm"] == pytest.approx(
        {
            "tokens_per_s_vs": "vllm-compiled",
            "tokens_per_s": 1.2,
            "cpu_s_per_token_vs": "vllm-eager",
            "cpu_s_per_token": 2 / 3,
        }  # fmt: skip
    )
    assert ratios["transformers"] == pytest.approx({"tokens_per_s": 3.0, "cpu_s_per_token": 0.25})
    assert offline_ratios({"vllm-eager": offline["vllm-eager"]}) == {}


def rates(attainment: list[float], goodput: list[float], ttft_p99: list[float]) -> dict:
    return {
        "rates": [
            {"offered_rate": 2.0 * (i + 1), "slo_attainment": a, "goodput_rps": g, "ttft_p99_s": t}
            for i, (a, g, t) in enumerate(zip(attainment, goodput, ttft_p99))
        ]
    }


def test_served_ratios_at_the_highest_rate_any_system_holds_the_slo():
    served = {
        "manta": rates([1.0, 0.95, 0.3], [2.0, 4.0, 1.0], [0.2, 0.4, 5.0]),
        "vllm-eager": rates([1.0, 0.5, 0.0], [2.0, 2.0, 0.0], [0.3, 2.0, 9.0]),
        "vllm-compiled": rates([0.95, 0.8, 0.1], [1.9, 3.0, 0.5], [0.3, 1.0, 8.0]),
    }
    got = served_ratios(served)
    assert got["rate_index"] == 1 and got["offered_rate"] == 4.0
    assert got["goodput_rps_vs"] == "vllm-compiled" and got["goodput_rps"] == pytest.approx(4 / 3)
    assert got["ttft_p99_s_vs"] == "vllm-compiled" and got["ttft_p99_s"] == pytest.approx(0.4)
    # Only vLLM holds it at the top rate, with no goodput from Manta's side there.
    served["vllm-eager"]["rates"][2]["slo_attainment"] = 0.9
    served["vllm-eager"]["rates"][2]["goodput_rps"] = 5.0
    assert served_ratios(served)["rate_index"] == 2
    assert served_ratios(served)["goodput_rps"] == pytest.approx(1.0 / 5.0)
    nobody = {name: rates([0.1], [0.0], [9.0]) for name in served}
    assert served_ratios(nobody) == {"rate_index": None}
    assert served_ratios({"manta": served["manta"]}) is None


def test_systems_flag_expands_vllm_and_keeps_run_order():
    assert parse_systems("transformers,vllm,manta") == [
        "manta", "vllm-eager", "vllm-compiled", "transformers"]  # fmt: skip
    assert parse_systems("manta-1proc,manta") == ["manta", "manta-1proc"]
    assert parse_systems("vllm-eager") == ["vllm-eager"]
    with pytest.raises(SystemExit, match="unknown system 'sglang'"):
        parse_systems("manta,sglang")


# -- reports -----------------------------------------------------------------------------------
def test_markdown_writes_notes_and_tables_with_escaped_cells():
    table = Table("Served", ["system", "TTFT p50/p99 s"], [["manta", "0.1 | 0.2"]])
    text = markdown([table], ["a note"])
    lines = text.splitlines()
    assert lines[0] == "# Manta against its peers" and "- a note" in lines
    at = lines.index("## Served")
    assert lines[at + 2 : at + 5] == [
        "| system | TTFT p50/p99 s |",
        "| --- | --- |",
        "| manta | 0.1 \\| 0.2 |",
    ]


def test_plot_is_a_png(tmp_path):
    served = {
        name: {"rates": [
            {"output_tokens_per_s": x, "e2e_p50_s": 1.0 + x / 100, "e2e_p99_s": 2.0 + x / 50,
             "ttft_p50_s": 0.1 + x / 1000, "ttft_p99_s": math.nan if x > 400 else 0.5}
            for x in (100.0 * scale, 300.0 * scale, 500.0 * scale)
        ]}
        for name, scale in (("manta", 1.0), ("vllm-eager", 0.7))
    }  # fmt: skip
    path = write_plot(tmp_path / "plots" / "compare.png", served)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


# -- real runs ---------------------------------------------------------------------------------
def test_load_generator_against_manta_serve(tiny_model, tmp_path):
    port = free_port()
    cmd = server_command("manta", tiny_model, port, tmp_path / "no-venv")
    server = start_server(cmd, server_env("manta"), port, tmp_path / "serve.log", timeout_s=240)
    try:
        assert server.model_name == tiny_model
        requests = poisson_requests(5, 2.0, 8, seed=1, vocab=1024)
        mark = server.meter.mark()
        run = run_load(server.base_url, server.model_name, requests, timeout_s=120)
        cpu_s, peak_rss = server.meter.since(mark)
        procs = list(server.meter.procs.values())
    finally:
        killed = stop_server(server)
    assert [r.error for r in run.results] == [None] * 5
    for result in run.results:
        assert 0 < result.ttft_s <= result.e2e_s
        assert result.completion_tokens == 8
        assert result.chunk_times_s == sorted(result.chunk_times_s)
    stats = summarize(run, Slo(ttft_s=30.0, tpot_s=10.0))
    assert stats["succeeded"] == 5 and stats["output_tokens"] == 40
    assert stats["goodput_rps"] == pytest.approx(5 / run.duration_s)
    assert cpu_s > 0 and peak_rss > 100 * 2**20
    assert len(procs) > 2  # the CLI, Ray's GCS and raylet at least
    assert killed == 0, "processes outlived the server's shutdown"
    assert not [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert server.proc.returncode is not None


def test_the_one_process_server_streams_the_offline_tokens(tiny_model, tmp_path):
    """The diagnostic server (router and engine in one process, no Ray) under the same load
    generator: every request streams the tokens the offline engine gives."""
    from workers import LLM, SamplingParams

    port = free_port()
    cmd = server_command("manta-1proc", tiny_model, port, tmp_path / "no-venv")
    server = start_server(cmd, server_env("manta-1proc"), port, tmp_path / "one.log")
    try:
        requests = poisson_requests(4, 4.0, 8, seed=2, vocab=1024)
        run = run_load(server.base_url, server.model_name, requests, timeout_s=60)
        with httpx.Client(timeout=60) as client:
            body = {"model": server.model_name, "prompt": requests[0].prompt_ids,
                    "max_tokens": 8, "temperature": 0, "ignore_eos": True}  # fmt: skip
            text = client.post(f"{server.base_url}/v1/completions", json=body).json()
    finally:
        stop_server(server)
    assert [r.error for r in run.results] == [None] * 4
    assert [r.completion_tokens for r in run.results] == [8] * 4
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    offline = LLM(tiny_model, num_blocks=64).generate(requests[0].prompt_ids, greedy)
    assert text["choices"][0]["text"] == offline[0].outputs[0].text


def test_offline_manta_and_transformers_quick(tiny_model, tmp_path):
    argv = ["--systems", "transformers,manta", "--skip-served", "--quick", "--model", tiny_model,
            "--num-requests", "8", "--out-dir", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((tmp_path / "compare.json").read_text())
    assert results["settings"]["systems"] == ["manta", "transformers"]
    assert results["served"] == {} and results["served_ratios"] is None
    assert results["machine"]["matmul_flops_per_s"] > 0
    manta, baseline = results["offline"]["manta"], results["offline"]["transformers"]
    assert len(manta["runs"]) == 2 and len(baseline["runs"]) == 1
    for run in manta["runs"] + baseline["runs"]:
        assert run["output_tokens"] == 8 * 48
        assert run["wall_s"] > 0 and run["cpu_s"] > 0
        assert run["tokens_per_s"] == pytest.approx(run["output_tokens"] / run["wall_s"])
    assert manta["tokens_per_s"] > 0 and manta["cpu_s_per_token"] > 0
    # Greedy Manta gives exactly the tokens `transformers` gives on the same checkpoint.
    assert baseline["identical_to_manta"] == baseline["compared_requests"] == 8
    ratio = results["offline_ratios"]["transformers"]["tokens_per_s"]
    assert ratio == pytest.approx(manta["tokens_per_s"] / baseline["tokens_per_s"])
    text = (tmp_path / "compare.md").read_text()
    assert "## Offline: all requests at once" in text and "| manta |" in text
    assert not (tmp_path / "compare.png").exists()  # no served runs, no latency plot


def test_process_tree_cpu_counts_newborns_fully():
    before = {(1, 0.0): 2.0, (2, 0.0): 1.0}
    after = {(1, 0.0): 3.5, (3, 5.0): 0.25}  # 2 exited, 3 was born in between
    assert cpu_between(before, after) == pytest.approx(1.75)


def test_server_commands_serve_the_same_model_with_vllms_modes(tmp_path):
    eager = server_command("vllm-eager", tmp_path / "m", 8123, tmp_path / "venv")
    compiled = server_command("vllm-compiled", tmp_path / "m", 8123, tmp_path / "venv")
    assert eager[0] == str(tmp_path / "venv" / "bin" / "python")
    assert eager[eager.index("--model") + 1] == str(tmp_path / "m")
    assert eager[eager.index("--dtype") + 1] == "float32" and "--enforce-eager" in eager
    assert compiled == [arg for arg in eager if arg != "--enforce-eager"]
    manta = server_command("manta", tmp_path / "m", 8123, tmp_path / "venv")
    assert manta[manta.index("--workers") + 1] == "1" and "8123" in manta
    assert server_env("manta") == {"RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": "local"}


def test_sigterm_stops_every_process_manta_serve_started(tiny_model, tmp_path):
    """A supervisor's SIGTERM drains like Ctrl-C: no Ray process outlives `manta serve`."""
    port = free_port()
    cmd = server_command("manta", tiny_model, port, tmp_path / "no-venv")
    server = start_server(cmd, server_env("manta"), port, tmp_path / "serve.log", timeout_s=240)
    try:
        server.meter.sample()
        procs = list(server.meter.procs.values())
        assert len(procs) > 2  # the CLI, Ray's GCS and raylet at least
        server.proc.send_signal(signal.SIGTERM)  # to the CLI alone, not its process group
        assert server.proc.wait(90) == 0
        _, alive = psutil.wait_procs([p for p in procs if p.is_running()], timeout=30)
        assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], alive
    finally:
        stop_server(server)
