"""Trace tools: the format round-trips, every synthetic family has the shape it promises
(deterministic, sorted, its rate, its caps, its bursts or skew), the public-trace importers
read their real formats and name what is wrong in a bad file, and the command line writes a
trace that `read_trace` accepts."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from benchmarks.trace_import import import_azure, import_burstgpt, import_mooncake
from benchmarks.traces import FAMILIES, generate, main
from kvstore.trace import TraceRequest, parse_lines, read_trace, write_trace

LENGTHS = dict(prompt_tokens=96, output_tokens=24, max_prompt_tokens=256, max_output_tokens=64)
DURATION_S, RATE = 60.0, 12.0


def arrivals(trace: list[TraceRequest]) -> np.ndarray:
    return np.array([r.arrival_s for r in trace])


# -- the format ---------------------------------------------------------------------------------
def test_format_round_trips(tmp_path):
    trace = generate("shared_prefix", 5.0, 10.0, seed=3, num_tenants=2, **LENGTHS)
    trace.append(TraceRequest(9.5, 40, 8, priority=-1))
    write_trace(tmp_path / "t.jsonl", trace)
    assert read_trace(tmp_path / "t.jsonl") == trace


@pytest.mark.parametrize(
    "bad",
    [
        "not json",
        "[1, 2]",
        '{"arrival_s": 1.0, "prompt_tokens": 5}',
        '{"arrival_s": 1.0, "prompt_tokens": 5, "output_tokens": 2, "colour": "red"}',
        '{"arrival_s": 1.0, "prompt_tokens": 5, "output_tokens": 2, "prefix_tokens": 3}',
        '{"arrival_s": 1.0, "prompt_tokens": 5, "output_tokens": 2, '
        '"prefix_group": "g", "prefix_tokens": 6}',
        '{"arrival_s": true, "prompt_tokens": 5, "output_tokens": 2}',
        '{"arrival_s": NaN, "prompt_tokens": 5, "output_tokens": 2}',
        '{"arrival_s": 1.0, "prompt_tokens": 5.5, "output_tokens": 2}',
    ],
)
def test_bad_line_raises_naming_it(bad):
    good = TraceRequest(0.5, 10, 4).to_json()
    with pytest.raises(ValueError, match=r"t\.jsonl line 3"):
        list(parse_lines([good, "", bad], "t.jsonl"))


# -- the families -------------------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_is_deterministic_sorted_and_within_caps(family):
    trace = generate(family, DURATION_S, RATE, seed=7, num_tenants=3, **LENGTHS)
    assert trace == generate(family, DURATION_S, RATE, seed=7, num_tenants=3, **LENGTHS)
    assert trace != generate(family, DURATION_S, RATE, seed=8, num_tenants=3, **LENGTHS)
    times = arrivals(trace)
    assert np.all(np.diff(times) >= 0) and times[0] >= 0 and times[-1] <= DURATION_S
    assert all(1 <= r.prompt_tokens <= LENGTHS["max_prompt_tokens"] for r in trace)
    assert all(1 <= r.output_tokens <= LENGTHS["max_output_tokens"] for r in trace)
    assert all(r.prefix_tokens <= r.prompt_tokens for r in trace)
    assert {r.tenant for r in trace} == {"t0", "t1", "t2"}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_family_mean_rate_and_lengths_are_the_requested_ones(family, seed):
    trace = generate(family, DURATION_S, RATE, seed=seed, **LENGTHS)
    assert len(trace) / DURATION_S == pytest.approx(RATE, rel=0.15)
    mean_output = np.mean([r.output_tokens for r in trace])
    # Clipping at the caps lowers the mean, the wide heavy-tailed spreads most.
    assert LENGTHS["output_tokens"] * 0.75 <= mean_output <= LENGTHS["output_tokens"] * 1.1


def test_generate_rejects_an_unknown_family():
    with pytest.raises(ValueError, match="unknown trace family 'zipf'"):
        generate("zipf", 10.0, 1.0)


def test_bursty_has_surges_and_poisson_has_none():
    def peak_over_median(trace: list[TraceRequest]) -> float:
        per_second = np.bincount(arrivals(trace).astype(int), minlength=int(DURATION_S))
        return per_second.max() / np.median(per_second)

    assert peak_over_median(generate("bursty", DURATION_S, RATE, seed=0, **LENGTHS)) >= 4
    assert peak_over_median(generate("poisson", DURATION_S, RATE, seed=0, **LENGTHS)) < 2.5


def test_diurnal_rate_follows_the_sinusoid():
    trace = generate("diurnal", DURATION_S, RATE, seed=0, amplitude=0.8, **LENGTHS)
    times = arrivals(trace)
    rising = np.sum(times < DURATION_S / 2)  # sin > 0 in the first half-period
    assert rising > 2 * (len(times) - rising)


def test_heavy_tailed_inter_arrivals_are_burstier_than_poisson():
    for seed in range(3):
        gaps = np.diff(arrivals(generate("heavy_tailed", DURATION_S, RATE, seed=seed, **LENGTHS)))
        assert gaps.std() / gaps.mean() > 1.2
    prompts = [r.prompt_tokens for r in generate("heavy_tailed", DURATION_S, RATE, **LENGTHS)]
    assert max(prompts) == LENGTHS["max_prompt_tokens"]  # the long tail reaches the cap


def test_shared_prefix_groups_are_zipf_skewed_and_share_their_prefix():
    trace = generate("shared_prefix", DURATION_S, RATE, seed=0, num_groups=4, **LENGTHS)
    counts = Counter(r.prefix_group for r in trace)
    by_rank = [counts[f"sys-{k}"] for k in range(4)]
    assert by_rank == sorted(by_rank, reverse=True) and by_rank[0] >= 3 * by_rank[-1]
    assert 0 < counts[None] < len(trace) / 2
    grouped = [r for r in trace if r.prefix_group is not None]
    assert {r.prefix_tokens for r in grouped} == {LENGTHS["prompt_tokens"] // 2}
    assert all(r.prompt_tokens > r.prefix_tokens for r in grouped)
    assert all(r.prefix_tokens == 0 for r in trace if r.prefix_group is None)


def test_shared_prefix_keeps_a_group_on_one_tenant():
    trace = generate("shared_prefix", DURATION_S, RATE, seed=0, num_tenants=3, **LENGTHS)
    tenants = {}
    for r in trace:
        if r.prefix_group is not None:
            tenants.setdefault(r.prefix_group, set()).add(r.tenant)
    assert all(len(names) == 1 for names in tenants.values()) and len(tenants) == 4


def test_shared_prefix_rejects_a_prefix_longer_than_the_prompt():
    with pytest.raises(ValueError, match="prefix_tokens"):
        generate("shared_prefix", 10.0, 1.0, prefix_tokens=200, **LENGTHS)


# -- the importers ------------------------------------------------------------------------------
BURSTGPT = """Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type
5,ChatGPT,472,18,490,Conversation log
45,ChatGPT,1087,0,1087,Conversation log
118,GPT-4,417,30,447,API log
120.5,ChatGPT,1360,313,1673,Conversation log
"""


def test_burstgpt_imports_rebased_and_skips_failed_requests(tmp_path):
    path = tmp_path / "BurstGPT_1.csv"
    path.write_text(BURSTGPT)
    trace = import_burstgpt(path)
    assert [(r.arrival_s, r.prompt_tokens, r.output_tokens) for r in trace] == [
        (0.0, 472, 18),
        (113.0, 417, 30),
        (115.5, 1360, 313),
    ]
    assert {r.tenant for r in trace} == {"default"}
    assert len(import_burstgpt(path, limit=2)) == 2


def test_burstgpt_bad_cell_names_file_line_and_column(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text(BURSTGPT.replace("417,30", "417,thirty"))
    with pytest.raises(ValueError, match=r"bad\.csv line 4, column 'Response tokens'"):
        import_burstgpt(path)
    path.write_text("Timestamp,Model,Request tokens\n5,ChatGPT,472\n")
    with pytest.raises(ValueError, match=r"bad\.csv line 1: missing columns \['Response tokens'\]"):
        import_burstgpt(path)


AZURE = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:15:46.6805900,374,44
2023-11-16 18:15:50.9951690,396,109
2023-11-16 18:15:51.2224670,879,0
2023-11-16 18:16:01.0000000,1020,12
"""


def test_azure_imports_seven_digit_timestamps(tmp_path):
    path = tmp_path / "AzureLLMInferenceTrace_conv.csv"
    path.write_text(AZURE)
    trace = import_azure(path)
    assert [r.arrival_s for r in trace] == pytest.approx([0.0, 4.314579, 14.31941], abs=1e-6)
    assert [r.prompt_tokens for r in trace] == [374, 396, 1020]
    assert [r.output_tokens for r in trace] == [44, 109, 12]


def test_azure_imports_the_2024_offset_form(tmp_path):
    path = tmp_path / "AzureLLMInferenceTrace_code_1week.csv"
    path.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2024-05-10 00:00:00.009930+00:00,2162,5\n"
        "2024-05-10 02:00:01.5+02:00,100,7\n"  # 00:00:01.5 UTC
    )
    assert [r.arrival_s for r in import_azure(path)] == pytest.approx([0.0, 1.49007], abs=1e-6)


def test_azure_bad_timestamp_names_file_line_and_column(tmp_path):
    path = tmp_path / "azure.csv"
    path.write_text(AZURE.replace("2023-11-16 18:15:50.9951690", "yesterday"))
    with pytest.raises(ValueError, match=r"azure\.csv line 3, column 'TIMESTAMP'"):
        import_azure(path)


def mooncake_lines(records: list[tuple[int, int, int, list[int]]]) -> str:
    """Mooncake JSONL of `(timestamp ms, input_length, output_length, hash_ids)` records."""
    keys = ("timestamp", "input_length", "output_length", "hash_ids")
    return "".join(json.dumps(dict(zip(keys, r))) + "\n" for r in records)


def test_mooncake_imports_with_prefix_groups(tmp_path):
    path = tmp_path / "mooncake_trace.jsonl"
    records = [
        (1000, 1400, 50, [7, 1, 2]),
        (1000, 1100, 9, [7, 1, 3]),
        (4052, 600, 30, [7, 4]),
        (5000, 300, 12, [8]),
        (6000, 0, 12, []),
    ]
    path.write_text(mooncake_lines(records))
    trace = import_mooncake(path)
    assert [r.arrival_s for r in trace] == [0.0, 0.0, 3.052, 4.0]
    assert [(r.prefix_group, r.prefix_tokens) for r in trace] == [
        ("mooncake-7", 1024),  # the most any member shares with it
        ("mooncake-7", 1024),  # two leading blocks in common
        ("mooncake-7", 512),  # one
        (None, 0),  # its first block is seen only once
    ]
    assert [r.prompt_tokens for r in trace] == [1400, 1100, 600, 300]


def test_mooncake_prefix_never_exceeds_either_prompt(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(mooncake_lines([(0, 700, 5, [0, 1]), (10, 2000, 5, [0, 1, 2, 3])]))
    assert [r.prefix_tokens for r in import_mooncake(path)] == [700, 700]


def test_mooncake_bad_line_names_file_line_and_field(tmp_path):
    path = tmp_path / "m.jsonl"
    good = {"timestamp": 0, "input_length": 10, "output_length": 5, "hash_ids": [0]}
    path.write_text(f"{json.dumps(good)}\n{json.dumps({**good, 'output_length': 'five'})}\n")
    with pytest.raises(ValueError, match=r"m\.jsonl line 2, column 'output_length'"):
        import_mooncake(path)
    path.write_text(f"{json.dumps(good)}\n{{truncated\n")
    with pytest.raises(ValueError, match=r"m\.jsonl line 2: not JSON"):
        import_mooncake(path)


# -- the command line ---------------------------------------------------------------------------
def test_cli_generates_a_trace_read_trace_accepts(tmp_path, capsys):
    out = tmp_path / "bursty.jsonl"
    argv = ["generate", "bursty", "--duration", "20", "--rate", "5", "--seed", "1"]
    argv += ["--prompt-tokens", "64", "--max-prompt-tokens", "128", "--out", str(out)]
    assert main(argv) == 0
    trace = read_trace(out)
    assert trace == generate("bursty", 20, 5, 1, prompt_tokens=64, max_prompt_tokens=128)
    assert max(r.prompt_tokens for r in trace) <= 128
    assert f"{len(trace)} requests" in capsys.readouterr().out


def test_cli_imports_a_public_trace(tmp_path, capsys):
    source, out = tmp_path / "burst.csv", tmp_path / "burst.jsonl"
    source.write_text(BURSTGPT)
    assert main(["import", "burstgpt", str(source), "--out", str(out), "--limit", "2"]) == 0
    assert [r.prompt_tokens for r in read_trace(out)] == [472, 417]
    assert "2 requests over 113.0 s" in capsys.readouterr().out


def test_cli_reports_a_malformed_file_and_writes_nothing(tmp_path, capsys):
    source, out = tmp_path / "azure.csv", tmp_path / "azure.jsonl"
    source.write_text(AZURE.replace("396,109", "396,many"))
    assert main(["import", "azure", str(source), "--out", str(out)]) == 1
    assert "azure.csv line 3, column 'GeneratedTokens'" in capsys.readouterr().err
    assert not out.exists()
