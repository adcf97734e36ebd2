"""`splitserve up`: the whole system on this machine (or a cluster, with --config).

It resolves the models (pulling SmolLM2-135M-Instruct once if needed), starts a private
Redis-compatible server unless the config names one (and starts it again on its port if it
dies; a Redis the config names must answer at start, or `up` stops with a clear error), starts
Ray locally and the Serve application, prints the URL with an example request, and on Ctrl-C
or SIGTERM stops everything it started.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path

from rich.console import Console

from rpc import ports
from splitserve.app_config import AppConfig, ModelSpec, parse_config

err = Console(stderr=True, soft_wrap=True)


def demo_config(
    model: str, port: int, grpc_port: int, mode: str, model_workers: int = 1,
    attention_workers: int = 1, weights: str = "auto",
) -> AppConfig:  # fmt: skip
    """The local demo: one model, one replica per role, auth off (and said so). Mode offload:
    model_workers model workers (no KV) over attention_workers attention workers. weights
    "gguf": the model's 4-bit GGUF blocks (engine load_format gguf)."""
    spec: dict = {"name": Path(model).name if "/" in model else model, "path": model, "mode": mode}
    if weights != "auto":
        spec["engine"] = {"load_format": weights}
    if mode == "offload":
        spec["colocated"] = {"replicas": model_workers}
        spec["attention"] = {"replicas": attention_workers, "kv_memory": "512MiB"}
    return parse_config(
        {
            "http": {"host": "127.0.0.1", "port": port},
            "grpc": {"host": "127.0.0.1", "port": grpc_port},
            "auth": {"enabled": False},
            "models": [spec],
        }
    )


def resolve_model_path(spec: ModelSpec) -> Path:
    from services.model_prep.presets import PRESETS, make_model
    from splitserve.models_pull import KNOWN_MODELS, pull_model, splitserve_home

    path = Path(spec.path).expanduser()
    if path.is_dir():
        return path
    if spec.path in KNOWN_MODELS:
        return pull_model(spec.path)
    if spec.path in PRESETS:
        # Random weights drawn by each replica (engine load_format dummy): the preset's config
        # and tokenizer only, not gigabytes of checkpoint written and read back.
        shapes = spec.engine.load_format == "dummy"
        out = splitserve_home() / "models" / f"preset-{spec.path}{'-shapes' if shapes else ''}"
        if not (out / "config.json").exists():
            make_model(spec.path, out, seed=0, write_weights=not shapes)
        return out
    raise FileNotFoundError(
        f"model {spec.path!r}: not a directory, a known model ({', '.join(KNOWN_MODELS)}) "
        f"or a preset ({', '.join(PRESETS)})"
    )


def resolve_embed_path(cfg: AppConfig) -> Path | None:
    """The embedding model's directory for an iccache section (a directory, or a known
    embedding model pulled once); None without one."""
    if cfg.iccache is None:
        return None
    from splitserve.embed_pull import EMBEDDERS, pull_embedder

    model = cfg.iccache.embed.model
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if model in EMBEDDERS:
        return pull_embedder(model)
    raise FileNotFoundError(
        f"iccache.embed.model {model!r}: not a directory or a known embedding model "
        f"({', '.join(EMBEDDERS)})"
    )


def _metrics_host() -> str:
    from splitserve.app import _bind_host

    host = _bind_host()
    return "127.0.0.1" if host in ("0.0.0.0", "::") else host


def _check_metrics_port(cfg: AppConfig) -> AppConfig:
    """The node's metrics port, or 0 (off, said so) when something else holds it."""
    from splitserve.app import _bind_host
    from splitserve.node_metrics import port_free

    port = cfg.metrics.port
    if port and not port_free(_bind_host(), port):
        err.print(
            f"[yellow]metrics port {port} is in use: no node /metrics (pick another with "
            "--metrics-port or metrics.port; each replica's own endpoint is still listed in "
            "Redis)[/]",
            highlight=False,
        )
        return cfg.model_copy(update={"metrics": cfg.metrics.model_copy(update={"port": 0})})
    return cfg


def serve_ingress_env() -> dict[str, str]:
    """HTTP enters through HAProxy straight to the router replicas' own HTTP servers (Serve's
    direct ingress) instead of through Serve's Python proxy actor and a Ray actor call per
    request and message: at low load on 2 cores a request's added time fell from ~10 ms to ~2 ms
    (bench/stack_latency.py). HAProxy's ports are this `up`'s own (Serve's defaults, 9101 and
    8404, would clash between two on one host; its files are per Ray node already), and a
    replica stopping drains for 2 s, not 30 (no outside load balancer here to tell): Ctrl-C
    stays quick. A replica's own code runs on its main event loop, not a loop on a thread of its
    own: every ASGI message and gRPC piece otherwise hops between the two threads (on 2 cores
    HTTP's added time a request 2.3 -> 1.7 ms, the router's CPU a streamed token 1.12 -> 0.92
    ms). Every replica's code here is async; engines step on their own threads."""
    return {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(_free_port()),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(_free_port()),
    }


def _free_port() -> int:
    return ports.free_port("127.0.0.1")


# How long `up` waits for the Redis a config names to answer before giving up (one that was
# started a moment ago may still be loading).
REDIS_WAIT_S = 5.0


def check_redis(url: str, wait_s: float | None = None) -> None:
    """The Redis the config names must answer before anything starts: a clear error now, not a
    system that comes up unable to place a request. ConnectionError (an OSError) otherwise."""
    import redis

    deadline = time.monotonic() + (REDIS_WAIT_S if wait_s is None else wait_s)
    while True:
        try:
            r = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
            try:
                r.ping()
                return
            finally:
                r.close()
        except (redis.RedisError, ValueError) as e:
            if time.monotonic() >= deadline:
                raise ConnectionError(
                    f"the cluster's Redis at {url} does not answer ({e}): start it, point "
                    "--redis (or the config's `redis:`) at one that answers, or leave it out "
                    "and `up` starts a private one"
                ) from None
        time.sleep(0.5)


def _revive(embedded, stop: threading.Event) -> None:
    """The private Redis server died: start it again on its port. Everything in it is gone;
    holders and replicas re-announce themselves within seconds, and until then the router
    serves with the replicas it last saw (its /health says so)."""
    from kvstore.redis_server import RedisServerError

    err.print(
        f"[yellow]the private Redis-compatible server at {embedded.url} exited; restarting it[/]",
        highlight=False,
    )
    while not stop.is_set():
        try:
            embedded.start()
            err.print(f"Redis-compatible server restarted at {embedded.url}", highlight=False)
            return
        except RedisServerError as e:
            err.print(f"[red]restarting the private Redis server failed: {e}; retrying[/]",
                      highlight=False)  # fmt: skip
            stop.wait(2.0)


def run_up(cfg: AppConfig, announce=print) -> None:
    if cfg.redis is not None:
        check_redis(cfg.redis)
    import ray
    from ray import serve

    from kvstore.redis_server import EmbeddedRedis
    from splitserve.app import build_application

    model_dirs = {m.name: resolve_model_path(m) for m in cfg.models}
    embed_dir = resolve_embed_path(cfg)
    cfg = _check_metrics_port(cfg)
    embedded = None
    redis_url = cfg.redis
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if redis_url is None:
            embedded = EmbeddedRedis().start()
            redis_url = embedded.url
            err.print(f"private Redis-compatible server at {redis_url}", highlight=False)
        if not cfg.auth.enabled:
            err.print(
                "[yellow]authentication is OFF (local demo): anyone who can reach "
                f"{cfg.http.host}:{cfg.http.port} can use it[/]",
                highlight=False,
            )
        # Ray lowers its workers to nice 15; here the workers are the service, and at 15 every
        # client or daemon on the host preempts the engine's threads (2 cores, 32 chats: 289
        # tok/s at nice 0 against 264). An operator's own setting wins.
        os.environ.setdefault("RAY_worker_niceness", "0")
        for k, v in serve_ingress_env().items():
            os.environ.setdefault(k, v)  # an operator's own setting wins
        ray.init(
            num_cpus=os.cpu_count(),
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=False,
            configure_logging=False,
        )
        serve.start(http_options={"host": cfg.http.host, "port": cfg.http.port})
        app = build_application(cfg, redis_url, model_dirs, embed_dir)
        serve.run(app, name="splitserve", route_prefix="/")
        url = f"http://{cfg.http.host}:{cfg.http.port}"
        first = cfg.iccache.routes[0].name if cfg.iccache else cfg.models[0].name
        announce(url)
        err.print(
            f"splitserve is up at {url} (OpenAI-compatible; gRPC Generate on "
            f"{cfg.grpc.host}:{cfg.grpc.port}). Try:\n"
            f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json' -d "
            f'\'{{"model": "{first}", "messages": [{{"role": "user", "content": '
            f'"What is the capital of France?"}}], "stream": true}}\'',
            highlight=False,
        )
        if cfg.metrics.port:
            err.print(
                "Prometheus metrics of every replica (router, prefill, decode, attention): "
                f"http://{_metrics_host()}:{cfg.metrics.port}/metrics",
                highlight=False,
            )
        while not stop.wait(0.5):
            if embedded is not None and not embedded.alive():
                _revive(embedded, stop)
    finally:
        err.print("stopping...", highlight=False)
        try:
            from ray import serve as _serve

            _serve.shutdown()
        except Exception as e:  # shutting down anyway
            err.print(f"serve shutdown: {e}", highlight=False)
        try:
            import ray as _ray

            _ray.shutdown()
        except Exception as e:
            err.print(f"ray shutdown: {e}", highlight=False)
        if embedded is not None:
            embedded.close()
        for s, h in previous.items():
            signal.signal(s, h)
