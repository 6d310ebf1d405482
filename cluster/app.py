"""Builds the Ray Serve application: an HTTP ingress in front of N worker replicas, or for one
worker a single replica that is both."""

from __future__ import annotations

import functools

from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from cluster.colocated import ColocatedServer
from cluster.config import ClusterConfig
from kvstore.index_actor import HEAD_NODE_RESOURCE
from router.ingress import Ingress
from router.prefix_router import PrefixAwareRequestRouter
from workers.deployment import WorkerDeployment
from workers.model.config import ModelConfig
from workers.model.tokenizer import Tokenizer

WORKER_DEPLOYMENT = "MantaWorker"
INGRESS_DEPLOYMENT = "MantaIngress"
COLOCATED_DEPLOYMENT = "MantaServer"


def build_app(config: ClusterConfig) -> Application:
    """The ingress in front of N worker replicas; with one worker (and `colocate_single_worker`)
    one replica that is both (cluster/colocated.py)."""
    model_config = ModelConfig.from_pretrained(config.model)
    engine_config = config.engine_config()
    frontend = {
        "model_name": config.model_name,
        "model_id": config.model_name,
        "max_model_len": min(
            engine_config.max_model_len or model_config.max_position_embeddings,
            model_config.max_position_embeddings,
        ),
        "block_size": config.engine.block_size,
        "affinity_prefix_tokens": config.router.affinity_prefix_tokens,
        "special_tokens_in_content": config.special_tokens_in_content,
        "max_tokens_cap": config.max_tokens_cap,
        "tool_call_parser": config.tool_call_parser,
    }
    tokenizer_factory = functools.partial(Tokenizer.from_pretrained, config.model)
    worker_kwargs = {
        "publish_interval_s": config.publish_interval_s,
        "max_in_flight": config.max_ongoing_requests,
        "stream_interval_s": config.stream_interval_s,
        "slo_ttft_s": config.slo_ttft_s,
        "slo_itl_s": config.slo_itl_s,
        "tracing": config.tracing_settings(),
    }
    shared = {"redis_url": config.redis_url, "index_ttl_s": config.index_ttl_s}
    fixed_single = config.num_workers == 1 and config.autoscaling is None
    if fixed_single and config.colocate_single_worker:
        server = serve.deployment(serve.ingress(None)(ColocatedServer)).options(
            name=COLOCATED_DEPLOYMENT,
            num_replicas=1,
            max_ongoing_requests=4096,
            ray_actor_options=worker_resources(config),
            health_check_period_s=5.0,
            graceful_shutdown_timeout_s=5.0,
        )
        return server.bind(
            engine_config, tokenizer_factory, frontend, config.http_settings(), **shared,
            **worker_kwargs,
        )  # fmt: skip
    worker = serve.deployment(WorkerDeployment).options(
        name=WORKER_DEPLOYMENT,
        **replicas(config),
        max_ongoing_requests=config.max_ongoing_requests,
        max_queued_requests=config.max_queued_requests,
        ray_actor_options=worker_resources(config),
        request_router_config=RequestRouterConfig(
            request_router_class=PrefixAwareRequestRouter,
            request_router_kwargs=router_kwargs(config),
            request_routing_stats_period_s=1.0,
        ),
        health_check_period_s=5.0,
        graceful_shutdown_timeout_s=5.0,
    )
    workers = worker.bind(engine_config, namespace=config.model_name, **shared, **worker_kwargs)
    ingress = serve.deployment(serve.ingress(None)(Ingress)).options(
        name=INGRESS_DEPLOYMENT,
        num_replicas=1,
        max_ongoing_requests=4096,
        ray_actor_options=ingress_resources(config),
    )
    http = {**config.http_settings(), "worker_deployment": WORKER_DEPLOYMENT}
    return ingress.bind(workers, tokenizer_factory, frontend, http, **shared)


def router_kwargs(config: ClusterConfig) -> dict:
    """The request router's settings; it aims at the cluster's TTFT SLO unless given its own."""
    kwargs = config.router.model_dump(exclude={"affinity_prefix_tokens"})
    if kwargs["slo_ttft_s"] is None:
        kwargs["slo_ttft_s"] = config.slo_ttft_s
    return kwargs


def replicas(config: ClusterConfig) -> dict:
    """A fixed number of workers, or Serve's autoscaling starting from `num_workers`."""
    if config.autoscaling is None:
        return {"num_replicas": config.num_workers}
    scaling = config.autoscaling.model_dump()
    low, high = scaling["min_replicas"], scaling["max_replicas"]
    scaling["initial_replicas"] = min(max(config.num_workers, low), high)
    return {"autoscaling_config": scaling}


def worker_resources(config: ClusterConfig) -> dict:
    options = {"num_cpus": config.num_cpus_per_worker, "num_gpus": config.num_gpus_per_worker}
    if config.worker_resources:
        options["resources"] = dict(config.worker_resources)
    return options


def ingress_resources(config: ClusterConfig) -> dict:
    options: dict = {"num_cpus": 0}  # it mostly waits on streams; the workers need the cores
    if config.ingress_on_head:
        options["resources"] = {HEAD_NODE_RESOURCE: 0.001}
    return options


def app_builder(args: dict) -> Application:
    """Entry point for `serve run cluster.app:app_builder model=...` and deploy/serve.yaml."""
    return build_app(ClusterConfig(**args))
