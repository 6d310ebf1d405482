"""The `manta` command as a user runs it."""

from __future__ import annotations

import subprocess
import sys

import pytest


def manta(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_make_model_then_generate(tmp_path):
    made = manta("make-model", str(tmp_path / "m"), "--preset", "tiny", "--arch", "qwen2")
    assert made.returncode == 0, made.stderr
    assert "qwen2" in made.stdout and "parameters" in made.stdout
    out = manta(
        "generate", "--model", str(tmp_path / "m"), "--prompt", "Hello", "--max-tokens", "5"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("[finish_reason=length]")
    chat = manta("generate", "--model", str(tmp_path / "m"), "--prompt", "Hi", "--chat",
                 "--max-tokens", "3", "--temperature", "0.7", "--seed", "1")  # fmt: skip
    assert chat.returncode == 0, chat.stderr


def test_make_a_draft_target_pair(tmp_path):
    made = manta("make-model", str(tmp_path), "--preset", "tiny", "--draft-layers", "1")
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "target" / "config.json").is_file()
    assert (tmp_path / "draft" / "tokenizer.json").is_file()
    assert made.stdout.count("wrote") == 2


def test_errors_are_one_clear_line(tmp_path):
    out = manta("generate", "--model", str(tmp_path / "missing"), "--prompt", "x")
    assert out.returncode == 2
    assert out.stderr.startswith("manta: error: no config.json in model directory")
    bad = manta("make-model", str(tmp_path / "m"), "--preset", "huge")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_train_the_scheduler_on_a_trace_then_load_what_it_wrote(tmp_path):
    from kvstore.trace import TraceRequest, write_trace
    from workers.learned_policy import LearnedParams

    trace = [TraceRequest(0.01 * i, 40 + (i * 53) % 300, 4 + (i * 11) % 30) for i in range(300)]
    write_trace(tmp_path / "t.jsonl", trace)
    out = manta("train-scheduler", "--trace", str(tmp_path / "t.jsonl"), "--out",
                str(tmp_path / "p.json"), "--rounds", "1", "--population", "4")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "round 1" in out.stdout and "wrote" in out.stdout
    assert isinstance(LearnedParams.load(tmp_path / "p.json"), LearnedParams)
    bad = manta("train-scheduler", "--trace", str(tmp_path / "missing.jsonl"), "--out", "x")
    assert bad.returncode == 2 and "missing.jsonl" in bad.stderr


def test_serve_takes_the_batching_policy_into_the_engine_settings(tmp_path):
    from cluster.cli import build_parser, engine_settings

    (tmp_path / "p.json").write_text("{}")
    args = build_parser().parse_args(
        ["serve", "--batching", "learned", "--learned-policy", str(tmp_path / "p.json")]
    )
    settings = engine_settings(args)
    assert settings["batching"] == "learned"
    assert settings["learned_policy"] == str((tmp_path / "p.json").resolve())
    assert "batching" not in engine_settings(build_parser().parse_args(["serve"]))


def test_serve_takes_the_router_policy(tmp_path):
    from cluster.cli import build_parser, serve_config

    parse = build_parser().parse_args
    args = parse(["serve", "--router-policy", "predicted-latency", "--workers", "2"])
    assert serve_config(args).router.policy == "predicted_latency"
    assert serve_config(parse(["serve"])).router.policy == "prefix"


def test_the_router_aims_at_the_cluster_ttft_slo_unless_given_its_own():
    from cluster.app import router_kwargs
    from cluster.cli import build_parser, serve_config

    parse = build_parser().parse_args
    config = serve_config(parse(["serve", "--router-policy", "predicted-latency",
                                 "--slo-ttft-s", "0.8"]))  # fmt: skip
    kwargs = router_kwargs(config)
    assert kwargs["policy"] == "predicted_latency" and kwargs["slo_ttft_s"] == 0.8
    assert "affinity_prefix_tokens" not in kwargs  # the ingress's, not the router's
    own = config.model_copy(update={"router": config.router.model_copy(update={"slo_ttft_s": 1.5})})
    assert router_kwargs(own)["slo_ttft_s"] == 1.5


def test_serve_takes_autoscaling_flags(tmp_path):
    from cluster.app import replicas
    from cluster.cli import build_parser, serve_config

    parse = build_parser().parse_args
    fixed = serve_config(parse(["serve", "--workers", "2"]))
    assert fixed.autoscaling is None and replicas(fixed) == {"num_replicas": 2}
    args = parse(["serve", "--max-workers", "3", "--target-ongoing-requests", "2",
                  "--downscale-delay-s", "5"])  # fmt: skip
    config = serve_config(args)
    scaling = replicas(config)["autoscaling_config"]
    assert (scaling["min_replicas"], scaling["max_replicas"], scaling["initial_replicas"]) == (
        1, 3, 1)  # fmt: skip
    assert scaling["target_ongoing_requests"] == 2 and scaling["downscale_delay_s"] == 5
    with pytest.raises(ValueError, match="below min_replicas"):
        serve_config(parse(["serve", "--min-workers", "3", "--max-workers", "2"]))


def test_serve_takes_worker_resources_and_keeps_the_ingress_on_the_head(tmp_path):
    from cluster.app import ingress_resources, worker_resources
    from cluster.cli import build_parser, serve_config
    from kvstore.index_actor import HEAD_NODE_RESOURCE

    parse = build_parser().parse_args
    config = serve_config(parse(["serve", "--workers", "2", "--cpus-per-worker", "0.5",
                                 "--worker-resources", '{"worker_slot": 1}']))  # fmt: skip
    assert worker_resources(config) == {
        "num_cpus": 0.5, "num_gpus": 0.0, "resources": {"worker_slot": 1.0}}  # fmt: skip
    assert ingress_resources(config)["resources"] == {HEAD_NODE_RESOURCE: 0.001}
    plain = serve_config(parse(["serve", "--workers", "2"]))
    assert "resources" not in worker_resources(plain)
    assert "resources" not in ingress_resources(plain.model_copy(update={"ingress_on_head": False}))
    assert parse(["serve", "--proxy-location", "HeadOnly"]).proxy_location == "HeadOnly"


@pytest.mark.parametrize("bad", ['{"slot": -1}', '["slot"]', "{slot: 1}", '{"slot": true}'])
def test_bad_worker_resources_are_refused_at_the_command_line(bad):
    done = manta("serve", "--worker-resources", bad)
    assert done.returncode == 2 and "--worker-resources" in done.stderr
