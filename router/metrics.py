"""Prometheus metrics of the serving front, in a registry of its own (no global state).

Latency histograms are observed here, where the streams pass; worker gauges and counters are
rendered from the stats each worker last reported, labelled by worker.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# worker stat -> (metric name, kind, help)
WORKER_METRICS = {
    "prefix_cache_queries": (
        "manta_prefix_cache_queries_total", "counter", "Prompt tokens looked up in the cache."
    ),
    "prefix_cache_hits": (
        "manta_prefix_cache_hits_total", "counter", "Prompt tokens served from the prefix cache."
    ),
    "num_requests_running": ("manta_num_requests_running", "gauge", "Requests holding KV."),
    "num_requests_waiting": ("manta_num_requests_waiting", "gauge", "Requests queued."),
    "kv_cache_usage": ("manta_kv_cache_usage_ratio", "gauge", "Fraction of KV blocks in use."),
    "num_blocks": ("manta_kv_blocks", "gauge", "KV blocks in the pool."),
    "num_free_blocks": (
        "manta_kv_free_blocks", "gauge", "KV blocks no request holds (cached ones included)."
    ),
    "num_preemptions": ("manta_num_preemptions_total", "counter", "Requests preempted."),
    "num_requests_shed": (
        "manta_requests_shed_total", "counter", "Requests refused: predicted TTFT over the SLO."
    ),
    "generation_tokens": ("manta_generation_tokens_total", "counter", "Tokens generated."),
    "kv_imported_blocks": (
        "manta_kv_blocks_loaded_total", "counter", "Prefix KV blocks loaded from the store."
    ),
    "kv_exported_blocks": (
        "manta_kv_blocks_shared_total", "counter", "Prefix KV blocks published to the store."
    ),
    "kv_import_rejected": (
        "manta_kv_blocks_rejected_total", "counter",
        "Shared KV blocks refused: MAC, dtype, shape or length did not verify.",
    ),
    "kv_store_corrupt": (
        "manta_kv_store_corrupt_entries_total", "counter", "Block store entries that did not parse."
    ),
    "spec_decode_proposed_tokens": (
        "manta_spec_decode_proposed_tokens_total", "counter", "Draft tokens proposed."
    ),
    "spec_decode_accepted_tokens": (
        "manta_spec_decode_accepted_tokens_total", "counter", "Draft tokens accepted."
    ),
}  # fmt: skip


FINISH_REASONS = ("stop", "length", "abort", "error", "tool_calls")


class _WorkerCollector:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self):
        reports = self.metrics.latest_worker_stats()
        model = self.metrics.model_name
        for key, (name, kind, doc) in WORKER_METRICS.items():
            family_cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            base = name.removesuffix("_total") if kind == "counter" else name
            family = family_cls(base, doc, labels=["model_name", "worker", "replica"])
            for report in reports:
                value = report.get(key, 0)
                if isinstance(value, (int, float)):  # an index entry is data, never trusted
                    replica = str(report.get("worker_id", ""))
                    family.add_metric([model, worker_name(report), replica], float(value))
            yield family


def worker_name(report: dict) -> str:
    """The readable name a worker reports (its node and replica rank), else its id."""
    name = report.get("worker_name")
    return name if isinstance(name, str) and name else str(report.get("worker_id", ""))


class Metrics:
    """The front's metrics, every one labelled with the served model's name (`model_name`)."""

    def __init__(self, model_name: str = "") -> None:
        self.model_name = model_name
        self.registry = registry = CollectorRegistry()
        model = ["model_name"]

        def histogram(name: str, doc: str):
            return Histogram(name, doc, model, buckets=LATENCY_BUCKETS, registry=registry).labels(
                model_name
            )

        self.ttft = histogram(
            "manta_time_to_first_token_seconds", "Seconds from request arrival to its first token."
        )
        self.itl = histogram(
            "manta_inter_token_latency_seconds",
            "Seconds between consecutive streamed tokens of a request.",
        )
        self.e2e = histogram(
            "manta_e2e_request_latency_seconds", "Seconds from request arrival to its last token."
        )
        self.queue_time = histogram(
            "manta_request_queue_time_seconds", "Seconds a request waited in its worker's queue."
        )
        self.prefill_time = histogram(
            "manta_request_prefill_time_seconds",
            "Seconds from a request's first scheduling to its first token.",
        )
        self.decode_time = histogram(
            "manta_request_decode_time_seconds", "Seconds from a request's first token to its end."
        )
        self.prompt_tokens = Counter(
            "manta_prompt_tokens", "Prompt tokens of finished engine requests.", model,
            registry=registry,
        ).labels(model_name)  # fmt: skip
        self._success = Counter(
            "manta_request_success",
            "Choices finished, by finish reason (stop, length, abort, error, tool_calls).",
            [*model, "finish_reason"],
            registry=registry,
        )
        self._requests = Counter(
            "manta_requests", "Requests finished, by HTTP status.", [*model, "status"],
            registry=registry,
        )  # fmt: skip
        self._recoveries = Counter(
            "manta_request_recoveries",
            "Requests whose worker failed: retried before the first token, or migrated after.",
            [*model, "kind"],
            registry=registry,
        )
        self.first_token_limit = Gauge(
            "manta_router_first_token_limit",
            "Requests the router lets wait for their first token at once (learned from TTFTs).",
            model,
            registry=registry,
        ).labels(model_name)
        self.waiting_first_token = Gauge(
            "manta_router_waiting_first_token",
            "Requests admitted by the router that have no first token yet.",
            model,
            registry=registry,
        ).labels(model_name)
        self._worker_stats: dict[str, dict] = {}
        registry.register(_WorkerCollector(self))

    def count_status(self, status: int | str) -> None:
        self._requests.labels(self.model_name, str(status)).inc()

    def count_recovery(self, kind: str) -> None:
        self._recoveries.labels(self.model_name, kind).inc()

    def count_finished(self, reasons: list[str]) -> None:
        for reason in reasons:
            self._success.labels(
                self.model_name, reason if reason in FINISH_REASONS else "stop"
            ).inc()

    def observe_finished(self, delta, e2e_s: float) -> None:
        """A choice's last delta: its end-to-end time, the worker's phase times, its prompt."""
        self.e2e.observe(e2e_s)
        self.queue_time.observe(delta.queue_s)
        self.prefill_time.observe(delta.prefill_s)
        self.decode_time.observe(delta.decode_s)
        self.prompt_tokens.inc(delta.num_prompt_tokens)

    def set_worker_stats(self, reports: dict[str, dict]) -> None:
        self._worker_stats = {
            w: {**stats, "worker_id": w} for w, stats in reports.items() if isinstance(stats, dict)
        }

    def latest_worker_stats(self) -> list[dict]:
        return list(self._worker_stats.values())

    def render(self) -> bytes:
        return generate_latest(self.registry)
