"""The deployment files in deploy/: each parses, follows its tool's schema, and carries app args
that a `ClusterConfig` accepts. (`ray up` and KubeRay cannot run here; `serve run` can.)"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import ray
import ray.autoscaler
import yaml
from ray.serve.schema import ServeDeploySchema

from cluster.config import ClusterConfig

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
IMPORT_PATH = "cluster.app:app_builder"


def load(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


def check_serve_config(config: dict, tmp_path: Path) -> ClusterConfig:
    """A valid Serve config whose one app is Manta's, with args that make a ClusterConfig."""
    schema = ServeDeploySchema.model_validate(config)
    (app,) = schema.applications
    assert app.import_path == IMPORT_PATH
    assert app.route_prefix == "/"
    cluster = ClusterConfig(**{**app.args, "model": str(tmp_path)})
    cluster.engine_config()  # the engine settings reach the engine's own config
    return cluster


def test_serve_config_runs_manta_with_valid_args(tmp_path):
    cluster = check_serve_config(load("serve.yaml"), tmp_path)
    assert cluster.num_gpus_per_worker == 0  # runs as is on CPU with `serve run`


def test_rayservice_embeds_a_serve_config_for_gpu_workers(tmp_path):
    manifest = load("rayservice.yaml")
    assert manifest["apiVersion"] == "ray.io/v1"
    assert manifest["kind"] == "RayService"
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    cluster = check_serve_config(serve_config, tmp_path)
    ray_cluster = manifest["spec"]["rayClusterConfig"]
    assert ray_cluster["rayVersion"] == ray.__version__
    assert ray_cluster["headGroupSpec"]["template"]["spec"]["containers"]
    gpus = 0
    for group in ray_cluster["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        per_pod = int(container["resources"]["limits"].get("nvidia.com/gpu", 0))
        gpus += per_pod * group["maxReplicas"]
    assert cluster.num_gpus_per_worker == 1
    assert cluster.num_workers <= gpus


def test_ray_up_config_follows_the_autoscaler_schema():
    config = load("cluster.yaml")
    schema_path = Path(ray.autoscaler.__file__).with_name("ray-schema.json")
    jsonschema.validate(config, json.loads(schema_path.read_text()))
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type"):
        assert key in config, key
    assert config["provider"]["type"] == "aws"
    assert config["head_node_type"] in config["available_node_types"]
    head = config["head_node_type"]
    workers = [t for name, t in config["available_node_types"].items() if name != head]
    assert workers and all(t["max_workers"] >= t.get("min_workers", 0) for t in workers)
    assert any("[gpu]" in command for command in config["setup_commands"])
    assert config["head_start_ray_commands"] and config["worker_start_ray_commands"]
    assert config["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-")
