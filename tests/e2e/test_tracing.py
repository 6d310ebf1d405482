"""OpenTelemetry traces of the served app, exported over OTLP/HTTP to a collector on
127.0.0.1: every request yields one trace holding the router's spans and its worker's, a
client's `traceparent` is continued, and the worker's phases hang below the router's span."""

from __future__ import annotations

import json
import secrets
import time

import httpx
import pytest
from ray import serve

from benchmarks.chaos import wait_pool_whole
from benchmarks.otlp_collector import Collector
from cluster.app import build_app
from cluster.config import ClusterConfig
from kvstore.index_actor import kill_index_actor

APP = "manta-tracing"


@pytest.fixture(scope="module")
def traced_app(ray_cluster, tiny_model):
    collector = Collector()
    name = "tiny-tracing"
    config = ClusterConfig(
        model=tiny_model,
        served_model_name=name,
        num_workers=2,
        num_cpus_per_worker=0.5,
        engine=dict(num_blocks=96),
        otlp_traces_endpoint=collector.url,  # a base URL: /v1/traces is added
    )
    serve.run(build_app(config), name=APP, route_prefix="/traced")
    yield f"http://127.0.0.1:{ray_cluster}/traced", name, collector
    serve.delete(APP)
    kill_index_actor(name)
    collector.stop()


def test_every_request_is_one_trace_across_router_and_worker(traced_app):
    base_url, model, collector = traced_app
    sent_ids = []
    with httpx.Client(base_url=base_url, timeout=60, trust_env=False) as client:
        for i in range(12):
            body = {"model": model, "prompt": [1 + i, 2, 3], "max_tokens": 4, "stream": i % 2 == 0}
            headers = {}
            if i % 3 == 0:  # a client that traces: its trace id must be kept
                trace_id = secrets.token_hex(16)
                headers["traceparent"] = f"00-{trace_id}-{secrets.token_hex(8)}-01"
                sent_ids.append(trace_id)
            response = client.post("/v1/completions", json=body, headers=headers)
            assert response.status_code == 200
            response.read()
        chat = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        assert client.post("/v1/chat/completions", json=chat).status_code == 200

    def complete() -> dict:
        traces = collector.traces()
        done = {
            t: spans for t, spans in traces.items()
            if {s.service for s in spans} == {"manta-router", "manta-worker"}
            # every span in: the router's ends after the worker's, maybe in a later export
            and {"generate", "worker request", "queue", "prefill", "decode"}
            <= {s.name for s in spans}
            and any(s.name.startswith("POST ") for s in spans)
        }  # fmt: skip
        return done

    deadline = time.time() + 30
    while len(complete()) < 13 and time.time() < deadline:
        time.sleep(0.3)
    traces = complete()
    assert len(traces) == 13, {t: sorted(s.name for s in v) for t, v in collector.traces().items()}
    assert set(sent_ids) <= set(traces)  # the client's trace ids, continued
    for spans in traces.values():
        by_id = {s.span_id: s for s in spans}
        (root,) = [s for s in spans if s.parent_span_id == "" or s.parent_span_id not in by_id]
        assert root.service == "manta-router" and root.name.startswith("POST /v1/")
        (generate,) = [s for s in spans if s.name == "generate"]
        (worker,) = [s for s in spans if s.name == "worker request"]
        assert worker.parent_span_id == generate.span_id  # the context crossed into the worker
        assert generate.attributes["manta.worker"] and worker.attributes["manta.worker"]
        assert generate.attributes["manta.finish_reason"] == "length"
        phases = {s.name: s for s in spans if s.name in ("queue", "prefill", "decode")}
        assert all(p.parent_span_id == worker.span_id for p in phases.values())
        assert phases["prefill"].attributes["manta.prompt_tokens"] >= 3
        assert "manta.routing.policy" in generate.attributes
        # The request router's decision: both candidates scored, the chosen one among them.
        assert generate.attributes["manta.routing.score_kind"] == "score"
        candidates = json.loads(generate.attributes["manta.routing.candidates"])
        assert len(candidates) == 2 and generate.attributes["manta.worker"] in candidates
        assert phases["prefill"].attributes["manta.tokens_from_store"] == 0  # no shared store
        decode = phases["decode"].attributes
        assert 0 <= decode["manta.spec.accepted"] <= decode["manta.spec.proposed"]
    whole, _ = wait_pool_whole(base_url)
    assert whole, "tracing left KV blocks or requests held"
