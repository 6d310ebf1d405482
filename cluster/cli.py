"""The `manta` command: make a model, generate from it, serve it, benchmark it."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import sys
from pathlib import Path

from router.tool_calls import PARSERS

DEFAULT_CACHE = Path(os.environ.get("MANTA_CACHE", Path.home() / ".cache" / "manta"))


def default_model() -> str:
    """The embedded default: a tiny random checkpoint, built once into the cache."""
    from workers.model.make_model import make_model

    path = DEFAULT_CACHE / "models" / "tiny"
    if not (path / "config.json").is_file():
        make_model(path, "tiny")
    return str(path)


def cmd_make_model(args: argparse.Namespace) -> int:
    from workers.model.config import ModelConfig
    from workers.model.draft_pair import make_draft_pair
    from workers.model.make_model import make_model

    if args.draft_layers:
        paths = make_draft_pair(
            args.out_dir, args.preset, args.draft_layers, args.upper_scale, seed=args.seed
        )
    else:
        paths = (
            make_model(
                args.out_dir, args.preset, args.arch, seed=args.seed, layout=args.layout,
                num_shards=args.shards,
            ),
        )  # fmt: skip
    for path in paths:
        params = ModelConfig.from_pretrained(path).num_parameters()
        print(
            f"wrote {args.preset} {args.arch} checkpoint ({params / 1e6:.1f}M parameters) to {path}"
        )
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from workers import Engine, EngineConfig, SamplingParams

    engine = Engine(EngineConfig(model=args.model or default_model(), **engine_settings(args)))
    prompt = args.prompt
    if args.chat:
        prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        prompt = engine.tokenizer.encode(prompt, add_special_tokens=False)
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed
    )
    engine.add_request(prompt, params)
    reason = None
    while engine.has_unfinished():
        for delta in engine.step():
            sys.stdout.write(delta.new_text)
            sys.stdout.flush()
            reason = delta.finish_reason
    print(f"\n[finish_reason={reason}]")
    return 0


def serve_config(args: argparse.Namespace):
    """The cluster's settings from `manta serve`'s flags (and MANTA_API_KEYS, OTEL_*)."""
    from cluster.config import ClusterConfig
    from kvstore.telemetry import settings_from_env

    gpus = args.gpus_per_worker
    if gpus is None:  # one GPU per engine where GPUs are asked for, or this machine has them
        gpus = 1.0 if args.device.startswith("cuda") or local_gpus() else 0.0
    cpus = args.cpus_per_worker
    if cpus is None:  # CPU workers split this machine's cores; GPU workers need few
        cpus = 1.0 if gpus else max(1.0, (os.cpu_count() or 1) / args.workers)
    given = {}  # flags left unset keep ClusterConfig's defaults
    keys = list(args.api_key or [])
    if os.environ.get("MANTA_API_KEYS"):
        keys.append(os.environ["MANTA_API_KEYS"])
    if keys:
        given["api_keys"] = keys
    if args.rate_limit_rps is not None:
        given["rate_limit_rps"] = args.rate_limit_rps
    if args.slo_ttft_s is not None:
        given["slo_ttft_s"] = args.slo_ttft_s or None
    if args.slo_itl_s:
        given["slo_itl_s"] = args.slo_itl_s
    if args.max_tokens_cap:
        given["max_tokens_cap"] = args.max_tokens_cap
    if args.tool_call_parser:
        given["tool_call_parser"] = args.tool_call_parser
    if args.stream_interval_ms is not None:
        given["stream_interval_s"] = args.stream_interval_ms / 1e3
    if args.record_trace:  # absolute: the ingress replica may run in another directory
        given["record_trace"] = str(Path(args.record_trace).resolve())
    if args.worker_resources:
        given["worker_resources"] = args.worker_resources
    if args.router_policy:
        given["router"] = {"policy": args.router_policy.replace("-", "_")}
    tracing = settings_from_env(
        args.otlp_traces_endpoint, args.otlp_traces_protocol, args.trace_sample_ratio
    )
    if tracing is not None:
        given["otlp_traces_endpoint"] = tracing["endpoint"]
        given["otlp_traces_protocol"] = tracing["protocol"]
        given["trace_sample_ratio"] = tracing["sample_ratio"]
    if args.max_workers is not None:
        scaling = {"min_replicas": args.min_workers, "max_replicas": args.max_workers,
                   "target_ongoing_requests": args.target_ongoing_requests,
                   "upscale_delay_s": args.upscale_delay_s,
                   "downscale_delay_s": args.downscale_delay_s}  # fmt: skip
        given["autoscaling"] = {k: v for k, v in scaling.items() if v is not None}
    config = ClusterConfig(
        model=args.model or default_model(),
        served_model_name=args.served_model_name or (None if args.model else "manta-tiny"),
        num_workers=args.workers,
        num_cpus_per_worker=cpus,
        num_gpus_per_worker=gpus,
        redis_url=args.redis_url,
        host=args.host,
        port=args.port,
        engine=engine_settings(args),
        **given,
    )
    return config


def cmd_serve(args: argparse.Namespace) -> int:
    import time

    from ray import serve

    from cluster.app import build_app
    from kvstore.index_actor import kill_index_actor

    config = serve_config(args)
    address = os.environ.get("RAY_ADDRESS")
    starts_ray = address in (None, "", "local")  # a fresh Ray instance on this machine
    direct = args.direct_ingress if args.direct_ingress is not None else starts_ray
    # SIGTERM (a supervisor, `kill`) stops serving the way Ctrl-C does, at any point from
    # here on: through the finally below, so nothing this command started outlives it.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        start_ray_and_serve(config, address, direct, args.proxy_location)
        signal.signal(signal.SIGTERM, _interrupt)  # again: ray.init installs a handler of its own
        serve.run(build_app(config), name="manta", route_prefix="/")
        print(f"manta: serving {config.model_name!r} on http://{config.host}:{config.port}/v1")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:  # Ctrl-C (or SIGTERM) is how a user stops serving
        print("manta: stopping: draining Serve and shutting down what was started")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal must not cut this short
        with contextlib.suppress(Exception):  # whatever part of the start-up happened
            serve.shutdown()
            kill_index_actor(config.model_name)
        if starts_ray:
            import ray

            ray.shutdown()  # the local Ray instance, its raylet, GCS and agents included
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def start_ray_and_serve(
    config, address: str | None, direct_ingress: bool, proxy_location: str | None = None
) -> None:
    """Start (or join) Ray, then Serve with its HTTP front.

    With direct ingress, clients reach the ingress replica itself on the port, with no Serve
    HTTP proxy process in between (Ray Serve's `RAY_SERVE_ENABLE_DIRECT_INGRESS`): on a
    2-core machine that hop cost the served path most of its throughput (see the compare
    benchmark). Serve still starts its proxy, idle, on a port of its own. The setting must
    reach every Serve process, so it travels in the environment (inherited by a Ray instance
    started here, and in the job's runtime environment for a cluster joined)."""
    import ray
    from ray import serve

    env: dict[str, str] = {}
    proxy_port = config.port
    if direct_ingress:
        env = {
            "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
            "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(config.port),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(config.port + 1),  # exclusive
            # Held-back ports protect HAProxy setups, which this is not: a restarted ingress
            # replica binds the port again at once.
            "RAY_SERVE_PORT_QUARANTINE_S": "0",
        }
        os.environ.update(env)
        with socket.socket() as sock:  # any free port for the idle proxy
            sock.bind((config.host, 0))
            proxy_port = sock.getsockname()[1]
    runtime_env = {"env_vars": env} if env else None
    ray.init(address=address, include_dashboard=False, runtime_env=runtime_env)
    serve.start(
        proxy_location=proxy_location, http_options={"host": config.host, "port": proxy_port}
    )


def resource_map(text: str) -> dict[str, float]:
    """`--worker-resources`: a JSON object of resource names to non-negative amounts."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
        for k, v in value.items()
    ):
        raise argparse.ArgumentTypeError('want an object of names to amounts, e.g. {"gpu_a": 1}')
    return {k: float(v) for k, v in value.items()}


def local_gpus() -> int:
    """GPUs this machine's torch can see (0 with a CPU build of torch)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def engine_settings(args: argparse.Namespace) -> dict:
    """The engine flags that were given; the rest keep EngineConfig's defaults."""
    kv_mb = getattr(args, "kv_cache_mb", None)
    values = {
        "dtype": args.dtype,
        "device": args.device,
        "attention_backend": args.attention_backend,
        "enforce_eager": args.enforce_eager or None,
        "kv_store_secret": getattr(args, "kv_store_secret", None),
        "kv_cache_bytes": kv_mb * 2**20 if kv_mb else None,
        "max_num_seqs": getattr(args, "max_num_seqs", None),
        "max_num_batched_tokens": getattr(args, "max_num_batched_tokens", None),
        "max_model_len": args.max_model_len,
        "batching": getattr(args, "batching", None),
        # absolute: a worker replica may run in another directory
        "learned_policy": resolved(getattr(args, "learned_policy", None)),
        "speculative": speculative_settings(args) if hasattr(args, "speculative_method") else None,
    }
    return {key: value for key, value in values.items() if value is not None}


def resolved(path: str | None) -> str | None:
    return str(Path(path).resolve()) if path else None


def speculative_settings(args: argparse.Namespace) -> dict | None:
    if args.speculative_method is None:
        return None
    k = args.num_speculative_tokens
    settings = {
        "method": args.speculative_method,
        "num_speculative_tokens": k if k == "auto" else int(k),
    }
    if args.speculative_model:
        settings["model"] = args.speculative_model
    return settings


def cmd_train_scheduler(args: argparse.Namespace) -> int:
    from kvstore.trace import read_trace
    from workers.learned_policy import LearnedParams
    from workers.policy_search import policy_cost, train
    from workers.simulator import SimSettings
    from workers.step_cost import DEFAULT_STEP_COST_PATH, BucketedStepCost

    traces = [read_trace(path) for path in args.trace]
    cost = BucketedStepCost.load(args.step_cost or DEFAULT_STEP_COST_PATH)
    settings = SimSettings(slo_ttft_s=args.slo_ttft, slo_itl_s=args.slo_itl)
    start = LearnedParams.load(args.start) if args.start else LearnedParams.load()
    before = policy_cost(start, traces, cost, settings)
    print(f"start: cost {before:.4f} over {sum(map(len, traces))} requests", flush=True)

    def progress(r) -> None:
        print(f"round {r.round}: best {r.best_cost:.4f}, population mean {r.mean_cost:.4f}")

    best, best_cost = train(
        traces, cost, settings, args.rounds, args.population, seed=args.seed, start=start,
        progress=progress,
    )  # fmt: skip
    best.save(
        args.out,
        trained_on=[str(Path(path).name) for path in args.trace],
        slo={"ttft_s": args.slo_ttft, "itl_s": args.slo_itl},
        cost_before=before,
        cost_after=best_cost,
    )
    print(f"wrote {args.out}: cost {before:.4f} -> {best_cost:.4f}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    module = importlib.import_module(f"benchmarks.{args.which}")
    return module.main(args.rest) or 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="manta", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-model", help="write a random-weight checkpoint in HF format")
    p.add_argument("out_dir")
    p.add_argument("--preset", choices=["tiny", "small", "compare", "bench"], default="tiny")
    p.add_argument("--arch", choices=["llama", "qwen2", "mistral"], default="llama")
    p.add_argument("--layout", choices=["v4", "v5"], default="v4")
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--draft-layers",
        type=int,
        help="write OUT_DIR/target and a draft of its first N layers (speculative decoding)",
    )
    p.add_argument(
        "--upper-scale",
        type=float,
        default=0.1,
        help="scale of the target's upper layers: smaller means the draft agrees more often",
    )
    p.set_defaults(func=cmd_make_model)

    p = sub.add_parser("generate", help="generate from one prompt, streaming to stdout")
    p.add_argument("--model", help="checkpoint directory (default: the embedded tiny model)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    add_device_flags(p)
    p.add_argument("--kv-cache-mb", type=int, help="KV pool size (default: 512 MiB on CPU)")
    p.add_argument("--max-model-len", type=int)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("serve", help="serve the OpenAI-compatible API on a Ray cluster")
    p.add_argument("--model", help="checkpoint directory (default: the embedded tiny model)")
    p.add_argument("--served-model-name", help="model name clients use (default: --model)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument(
        "--cpus-per-worker",
        type=float,
        help="CPUs (and compute threads) per worker; default on CPU: this machine's cores "
        "split among the workers",
    )
    p.add_argument(
        "--gpus-per-worker",
        type=float,
        help="GPUs each worker reserves (default: 1 with --device cuda or when this machine "
        "has GPUs, else 0)",
    )
    p.add_argument(
        "--worker-resources",
        type=resource_map,
        metavar="JSON",
        help='custom Ray resources each worker reserves, e.g. \'{"accelerator_type:H100": '
        "0.001}' or one that only the nodes meant for workers declare",
    )
    p.add_argument(
        "--proxy-location",
        choices=["EveryNode", "HeadOnly"],
        help="where Serve runs its HTTP proxies when joining RAY_ADDRESS (default EveryNode; "
        "HeadOnly when the nodes share one address, as several nodes on one machine do)",
    )
    p.add_argument("--redis-url", help="share the prefix index in Redis (default: embedded)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--direct-ingress",
        action=argparse.BooleanOptionalAction,
        help="clients reach the ingress replica on --port with no Serve HTTP proxy hop "
        "(default: on when this starts its own Ray instance, off when joining RAY_ADDRESS)",
    )
    p.add_argument(
        "--stream-interval-ms",
        type=float,
        help="after a stream's first token, at most one message per this many ms (default 50; "
        "0: every step's tokens at once)",
    )
    p.add_argument(
        "--api-key",
        action="append",
        metavar="KEY[:TENANT]",
        help="require `Authorization: Bearer KEY` on /v1 (repeatable; also MANTA_API_KEYS, "
        "comma-separated); TENANT isolates that key's prefix cache",
    )
    p.add_argument("--rate-limit-rps", type=float, help="requests per second per tenant")
    p.add_argument(
        "--slo-ttft-s",
        type=float,
        help="refuse (429) requests whose predicted time to first token exceeds this "
        "(default 2; 0: never)",
    )
    p.add_argument(
        "--tool-call-parser",
        choices=PARSERS,
        help="how the model writes tool calls, read for tool_choice auto (default: the format "
        "its chat template teaches: mistral, llama3_json, else hermes)",
    )
    p.add_argument(
        "--max-tokens-cap",
        type=int,
        help="the most tokens one choice may generate: the default max_tokens (else what the "
        "context leaves after the prompt), and a 400 above it",
    )
    p.add_argument(
        "--slo-itl-s",
        type=float,
        help="refuse (429) requests that would grow a worker's decode batch past what keeps "
        "each step within this many seconds (default: never)",
    )
    p.add_argument(
        "--kv-store-secret",
        help="key of the MAC on every shared KV payload (or MANTA_KV_STORE_SECRET); with "
        "--redis-url, workers share hot prompt KV only when it is set",
    )
    p.add_argument(
        "--record-trace",
        metavar="FILE",
        help="append the served traffic to FILE as a JSONL trace: one line per request with "
        "token counts and timings, never prompt or completion text",
    )
    add_device_flags(p)
    traces = p.add_argument_group("tracing (OpenTelemetry; also OTEL_EXPORTER_OTLP_* variables)")
    traces.add_argument(
        "--otlp-traces-endpoint", metavar="URL", help="OTLP collector, e.g. http://host:4318"
    )
    traces.add_argument("--otlp-traces-protocol", choices=["http/protobuf", "grpc"])
    traces.add_argument(
        "--trace-sample-ratio", type=float, help="share of requests traced (default 1.0)"
    )
    scaling = p.add_argument_group("autoscaling (on with --max-workers; --workers is the start)")
    scaling.add_argument("--max-workers", type=int, help="workers the app may grow to")
    scaling.add_argument("--min-workers", type=int, help="workers kept when idle (default 1)")
    scaling.add_argument(
        "--target-ongoing-requests", type=float, help="requests per worker aimed at (default 8)"
    )
    scaling.add_argument("--upscale-delay-s", type=float, help="default 10")
    scaling.add_argument("--downscale-delay-s", type=float, help="default 60")
    p.add_argument(
        "--router-policy",
        choices=["prefix", "predicted-latency", "round-robin", "least-loaded"],
        help="how a request's worker is chosen (default prefix: cached prompt blocks against "
        "load; predicted-latency: the lowest predicted time to first token)",
    )
    p.add_argument("--kv-cache-mb", type=int, help="KV pool per worker (default: 512 MiB on CPU)")
    p.add_argument("--max-num-seqs", type=int, help="most sequences in one step (default 64)")
    p.add_argument("--max-num-batched-tokens", type=int, help="most tokens in one step (2048)")
    p.add_argument("--max-model-len", type=int)
    p.add_argument(
        "--batching",
        choices=["adaptive", "fixed", "learned"],
        help="how each step's token budget, sequence cap, queue order and admission are chosen "
        "(default adaptive)",
    )
    p.add_argument(
        "--learned-policy",
        metavar="FILE",
        help="--batching learned: parameters from manta train-scheduler (default: the shipped)",
    )
    p.add_argument("--speculative-method", choices=["ngram", "draft"])
    p.add_argument("--speculative-model", help="draft checkpoint (with --speculative-method draft)")
    p.add_argument("--num-speculative-tokens", default="auto", help="k per step, or auto")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "bench",
        help="run a benchmark: engine, routing, spec_decode, compare, scheduling, or calibrate "
        "(fit the simulator's step cost to this machine)",
    )
    p.add_argument(
        "which", choices=["engine", "routing", "spec_decode", "compare", "scheduling", "calibrate"]
    )
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "train-scheduler",
        help="train the learned batching policy in the simulator on traces (JSONL)",
    )
    p.add_argument("--trace", action="append", required=True, help="a trace file (repeatable)")
    p.add_argument("--out", required=True, help="where to write the learned parameters")
    p.add_argument(
        "--step-cost",
        help="the step cost to simulate (manta bench calibrate); default: the shipped one",
    )
    p.add_argument("--slo-ttft", type=float, default=1.0, help="seconds to first token")
    p.add_argument("--slo-itl", type=float, default=0.025, help="mean seconds per output token")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--population", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start", help="parameters to start from (default: the shipped ones)")
    p.set_defaults(func=cmd_train_scheduler)

    p = sub.add_parser("status", help="workers and the prefix index of a running `manta serve`")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    p.add_argument("--json", action="store_true", help="print the raw answer of GET /status")
    p.set_defaults(func=cmd_status)
    return parser


def cmd_status(args: argparse.Namespace) -> int:
    import httpx

    from router.status import render

    try:
        response = httpx.get(args.url.rstrip("/") + "/status", timeout=10, trust_env=False)
        response.raise_for_status()
    except httpx.HTTPError as error:
        print(f"manta: error: no status from {args.url}: {error}", file=sys.stderr)
        return 1
    answer = response.json()
    print(json.dumps(answer, indent=2) if args.json else render(answer))
    return 0


def add_device_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device",
        default="auto",
        help="auto (the worker's GPU when CUDA is available, else CPU), cpu, cuda",
    )
    p.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto (default): bfloat16 on CUDA, float32 on CPU",
    )
    p.add_argument(
        "--attention-backend",
        choices=["auto", "torch", "triton", "flash_attn"],
        help="auto (default): flash_attn if installed, else triton, on CUDA; torch on CPU",
    )
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode steps")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as error:
        print(f"manta: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
