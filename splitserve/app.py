"""The Ray Serve application: the router as HTTP ingress, plus prefill, decode (or colocated)
replicas per model, built from one AppConfig.

Ray Serve places, starts, health-checks and scales the replicas; the services still talk gRPC
to each other (each replica serves its own port and registers it in Redis), so the same
services run without Ray too.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

from ray import serve

from splitserve.app_config import AppConfig, ModelSpec, ReplicaSpec

log = logging.getLogger(__name__)


def _bind_host() -> str:
    # Replicas on other nodes must be reachable: SPLITSERVE_BIND_HOST=0.0.0.0 in a cluster.
    return os.environ.get("SPLITSERVE_BIND_HOST", "127.0.0.1")


@serve.deployment(health_check_period_s=5, health_check_timeout_s=30)
class EngineReplica:
    """One prefill, decode or colocated server (engine + gRPC port) inside a Serve replica."""

    async def __init__(
        self, role: str, model: dict, model_dir: str, redis_url: str, namespace: str
    ) -> None:
        from kvstore.sizes import parse_size
        from services.engine.config import EngineConfig

        spec = ModelSpec.model_validate(model)
        side: ReplicaSpec = getattr(spec, role)
        e = spec.engine
        device = _device(side)
        if device == "cpu":
            import torch

            torch.set_num_threads(side.threads or os.cpu_count() or 1)
        cfg = EngineConfig(
            dtype=spec.dtype,
            max_num_seqs=e.max_num_seqs,
            max_num_batched_tokens=side.max_num_batched_tokens or e.max_num_batched_tokens,
            num_kv_blocks=e.num_kv_blocks,
            block_size=e.block_size,
            max_model_len=e.max_model_len,
            device=device,
        )
        engine = await asyncio.to_thread(_build_engine, model_dir, cfg)
        if role == "prefill":
            from services.prefill import PrefillServer

            self.server = PrefillServer(
                engine, spec.name, redis_url, _bind_host(), 0, parse_size(side.kv_memory),
                namespace=namespace, max_waiting=side.max_waiting, metrics_port=0,
                device_pool_bytes=parse_size(side.device_pool),
            )  # fmt: skip
        else:
            from services.decode import DecodeServer

            self.server = DecodeServer(
                engine, spec.name, redis_url, _bind_host(), 0, namespace=namespace,
                colocated=role == "colocated", max_waiting=side.max_waiting, metrics_port=0,
            )  # fmt: skip
        self.address = await self.server.start()
        log.info("%s replica of %s serving on %s", role, spec.name, self.address)

    async def check_health(self) -> None:
        if self.server.app.draining:
            raise RuntimeError("draining")

    async def address_of(self) -> str:
        return self.address

    async def __del__(self) -> None:
        await self.server.stop(drain_s=10)


NOSET_CUDA_VISIBLE = "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"


def _build_engine(model_dir: str, cfg):
    from services.engine.engine import LLMEngine

    if cfg.device.startswith("cuda:"):
        import torch

        # The current device is per thread: kernels launched while building (graph capture,
        # warm-up) must run on the engine's own GPU.
        torch.cuda.set_device(cfg.device)
    return LLMEngine(model_dir, cfg)


def _device(side: ReplicaSpec) -> str:
    if side.num_gpus <= 0:
        return "cpu"
    import ray

    return gpu_device(ray.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES"))


def gpu_device(gpu_ids: list, visible: str | None) -> str:
    """The torch device of the GPU Ray assigned (its first id), given CUDA_VISIBLE_DEVICES as
    this process sees it: unset (every GPU visible) the id is the index; set, the index is the
    id's position in that list (Ray's default: a list of just this replica's GPU)."""
    if not gpu_ids:
        return "cuda"
    gid = str(gpu_ids[0])
    if visible is None:
        return f"cuda:{int(gid)}"
    ids = [v.strip() for v in visible.split(",")]
    return f"cuda:{ids.index(gid)}" if gid in ids else "cuda"


@serve.deployment(health_check_period_s=5)
@serve.ingress()
class RouterReplica:
    """The HTTP ingress (the ASGI app router.app builds) plus the gRPC Generate service."""

    async def __init__(self, build: dict, *workers: Any) -> None:
        from protos.splitserve.v1 import generate_pb2_grpc
        from router.grpc_api import SERVICE_NAME, GenerateServicer
        from services.grpc_app import ServiceApp
        from services.wire import sampling_from_pb

        self.workers = workers  # held so Serve deploys them with the router
        self.asgi, self.backend, tokenizers, tenants = _router_parts(build)
        self.grpc: ServiceApp | None = None
        if build["grpc_port"] is not None:
            try:
                # grpc sets SO_REUSEPORT: several router replicas on a host share the port.
                self.grpc = ServiceApp(build["grpc_host"], build["grpc_port"])
            except OSError as e:
                log.warning("gRPC Generate service not started: %s", e)
        if self.grpc is not None:
            servicer = GenerateServicer(self.backend, tokenizers, sampling_from_pb, tenants)
            generate_pb2_grpc.add_GenerateServicer_to_server(servicer, self.grpc.server)
            self.grpc.add(SERVICE_NAME)
            await self.grpc.start()

    def __serve_build_asgi_app__(self):
        return self.asgi

    async def __del__(self) -> None:
        if self.grpc is not None:
            await self.grpc.stop()
        await self.backend.close()


def _router_parts(build: dict):
    """Everything the router replica needs, made inside the replica (gRPC channels and Redis
    clients belong to its event loop)."""
    from router.app import build_app
    from router.tenants import Tenants
    from services.engine.tokenizer import load_tokenizer
    from splitserve.backend import ModelInfo, PoolBackend

    models = {m["name"]: ModelInfo(**m) for m in build["models"]}
    backend = PoolBackend(build["redis_url"], models, build["namespace"])
    tokenizers = {name: load_tokenizer(d) for name, d in build["model_dirs"].items()}
    tenants = Tenants.load(build["tenants_file"]) if build["auth"] else None
    app = build_app(backend, tokenizers, tenants)  # HTTP and gRPC share the tenants' limits
    return app, backend, tokenizers, tenants


def build_application(cfg: AppConfig, redis_url: str, model_dirs: dict[str, Path]):
    """The Serve application for `cfg`; model_dirs maps model names to resolved directories."""
    from services.engine.config import ModelConfig
    from services.engine.engine import model_fingerprint

    workers = []
    models = []
    for m in cfg.models:
        d = model_dirs[m.name]
        mc = ModelConfig.from_dir(d)
        models.append(
            {
                "name": m.name,
                "model_id": model_fingerprint(d),
                "block_size": m.engine.block_size,
                "max_model_len": m.engine.max_model_len or mc.max_position_embeddings,
                "mode": m.mode,
            }
        )
        roles = ("prefill", "decode") if m.mode == "disaggregated" else ("colocated",)
        for role in roles:
            side: ReplicaSpec = getattr(m, role)
            actor: dict[str, Any] = {"num_cpus": side.num_cpus, "num_gpus": side.num_gpus}
            if side.num_gpus > 0:
                # Every GPU of the node stays visible (the replica picks its own from
                # ray.get_gpu_ids()), so a decode replica can open a prefill replica's CUDA IPC
                # handle and copy its KV GPU to GPU; with Ray's default, each replica sees only
                # its own GPU and the hand-off falls back to host memory.
                actor["runtime_env"] = {"env_vars": {NOSET_CUDA_VISIBLE: "1"}}
            opts: dict[str, Any] = {"name": f"{role}-{m.name}", "ray_actor_options": actor}
            if side.autoscaling is not None:
                opts["autoscaling_config"] = side.autoscaling.model_dump()
            else:
                opts["num_replicas"] = side.replicas
            workers.append(
                EngineReplica.options(**opts).bind(
                    role, m.model_dump(), str(d), redis_url, cfg.namespace
                )
            )
    build = {
        "models": models,
        "model_dirs": {m.name: str(model_dirs[m.name]) for m in cfg.models},
        "redis_url": redis_url,
        "namespace": cfg.namespace,
        "auth": cfg.auth.enabled,
        "tenants_file": cfg.auth.tenants_file,
        "grpc_host": cfg.grpc.host,
        "grpc_port": cfg.grpc.port,
    }
    return RouterReplica.options(
        name="router",
        num_replicas=cfg.router.replicas,
        max_ongoing_requests=cfg.router.max_ongoing_requests,
        ray_actor_options={"num_cpus": cfg.router.num_cpus},
    ).bind(build, *workers)
