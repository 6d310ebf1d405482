"""/metrics over real HTTP with a real engine and the `openai` client: the request-level
histograms (end to end, queue, prefill, decode), the prompt-token and finish-reason counters,
and the `model_name` label on every Manta sample."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from router.metrics import FINISH_REASONS, WORKER_METRICS, Metrics
from tests.http_server import served_engine, wait_pool_whole

ROOT = Path(__file__).resolve().parents[1]
HISTOGRAMS = (
    "manta_e2e_request_latency_seconds",
    "manta_request_queue_time_seconds",
    "manta_request_prefill_time_seconds",
    "manta_request_decode_time_seconds",
    "manta_time_to_first_token_seconds",
)


def scrape(base_url: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of every sample on the page."""
    text = httpx.get(base_url + "/metrics", timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples, name: str, **labels) -> float:
    want = {"model_name": "tiny", **labels}
    return sum(
        v
        for (n, ls), v in samples.items()
        if n == name and all(dict(ls).get(k) == x for k, x in want.items())
    )


def test_request_metrics_follow_what_was_served(tiny_model):
    with served_engine(tiny_model, num_blocks=64) as (client, engine):
        base_url = str(client.base_url).removesuffix("/v1/")
        prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
        client.completions.create(model="tiny", prompt=prompts, max_tokens=4, extra_body={
            "ignore_eos": True})  # fmt: skip
        stream = client.completions.create(
            model="tiny", prompt=[1, 2, 3, 4], max_tokens=6, stream=True, n=2,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        assert sum(1 for _ in stream) > 0  # read to the end
        wait_pool_whole(engine)
        samples = scrape(base_url)

    # Two prompts, then two streamed choices: four engine requests finished by length.
    finished = 4
    for name in HISTOGRAMS:
        assert value(samples, name + "_count") >= finished, name
    assert value(samples, "manta_request_success_total", finish_reason="length") >= finished
    assert value(samples, "manta_prompt_tokens_total") >= 3 + 5 + 4 + 4
    e2e = value(samples, "manta_e2e_request_latency_seconds_sum")
    decode = value(samples, "manta_request_decode_time_seconds_sum")
    assert 0 < decode < e2e  # a part of the whole, measured on the worker
    # Every Manta sample names the model, and finish reasons stay within the known set.
    for name, labels in samples:
        if name.startswith("manta_"):
            assert dict(labels).get("model_name") == "tiny", name
        if name == "manta_request_success_total":
            assert dict(labels)["finish_reason"] in FINISH_REASONS


def test_a_client_that_leaves_mid_stream_is_counted_as_abort(tiny_model):
    with served_engine(tiny_model, num_blocks=64) as (client, engine):
        base_url = str(client.base_url).removesuffix("/v1/")
        body = {"model": "tiny", "prompt": [3, 4, 5], "max_tokens": 400, "stream": True,
                "ignore_eos": True}  # fmt: skip
        with httpx.stream("POST", base_url + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    break  # the first chunk: leave
        wait_pool_whole(engine)
        for _ in range(50):
            samples = scrape(base_url)
            if value(samples, "manta_request_success_total", finish_reason="abort"):
                break
        assert value(samples, "manta_request_success_total", finish_reason="abort") == 1
        assert value(samples, "manta_request_success_total", finish_reason="length") == 0


def exported_names(page: str) -> set[str]:
    """Every series name a /metrics page can hold: its families, and their samples' names
    (`_total`, `_bucket`, `_sum`, `_count`)."""
    names = set()
    for family in text_string_to_metric_families(page):
        names.add(family.name)
        names.update(s.name for s in family.samples)
        if family.type == "counter":
            names.add(family.name + "_total")
        if family.type == "histogram":
            names.update(family.name + end for end in ("_bucket", "_sum", "_count"))
    return names


def test_every_dashboard_query_names_an_exported_metric(tiny_model):
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "manta.json").read_text())
    with served_engine(tiny_model, num_blocks=64) as (client, _):
        base_url = str(client.base_url).removesuffix("/v1/")
        client.completions.create(model="tiny", prompt=[1, 2, 3], max_tokens=2)
        page = httpx.get(base_url + "/metrics", timeout=10).text
    metrics = Metrics("tiny")  # the worker families, as a report with every stat renders them
    metrics.set_worker_stats({"w": {key: 0 for key in WORKER_METRICS}})
    exported = exported_names(page) | exported_names(metrics.render().decode())
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\bmanta_\w+", target["expr"])
    }
    assert len(queried) >= 15 and len(dashboard["panels"]) >= 10
    assert queried <= exported, sorted(queried - exported)
    scrape_config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    (job,) = scrape_config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"


def test_worker_samples_are_labelled_by_name_and_by_replica():
    """`worker` is the readable node/rank name (kept by a replacement replica), `replica` the
    Serve replica's id; a report without a name falls back to its id, and the dashboard
    groups by the readable one."""
    metrics = Metrics("tiny")
    metrics.set_worker_stats({
        "r1": {"worker_id": "r1", "worker_name": "10.0.0.7/worker-0", "num_requests_running": 3},
        "r2": {"worker_id": "r2", "num_requests_running": 1},
    })  # fmt: skip
    page = metrics.render().decode()
    named = 'model_name="tiny",replica="r1",worker="10.0.0.7/worker-0"'
    assert f"manta_num_requests_running{{{named}}} 3.0" in page
    assert 'manta_num_requests_running{model_name="tiny",replica="r2",worker="r2"} 1.0' in page
    dashboard = (ROOT / "deploy" / "grafana" / "manta.json").read_text()
    assert "{{worker}}" in dashboard and "worker_name" not in dashboard
