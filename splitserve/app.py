"""The Ray Serve application: the router as HTTP ingress, plus prefill, decode (or colocated)
replicas per model, the attention replicas that lend them KV, and IC-Cache's embedding
replicas, from the typed configs splitserve.deployment builds.

Ray Serve places, starts, health-checks and scales the replicas; the services still talk gRPC
to each other (each replica serves its own port and registers it in Redis), so the same
services run without Ray too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

from ray import serve

from router.config import RouterConfig
from services.config import AttentionConfig, DecodeConfig, PrefillConfig, ReplicaConfig
from splitserve.app_config import AppConfig
from splitserve.deployment import EmbedPlan, plan_deployment
from splitserve.node_metrics import NodeMetrics, NodeMetricsConfig, serve_registry

log = logging.getLogger(__name__)

NOSET_CUDA_VISIBLE = "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"


def _bind_host() -> str:
    # Replicas on other nodes must be reachable: SPLITSERVE_BIND_HOST=0.0.0.0 in a cluster.
    return os.environ.get("SPLITSERVE_BIND_HOST", "127.0.0.1")


class _ServedReplica:
    """What a Serve replica running one gRPC server shares: health, address, drain on exit."""

    server: Any
    address: str
    drain_s: float = 10
    node: NodeMetrics | None = None

    def _join_node(self, node_metrics: NodeMetricsConfig | None) -> None:
        """Put this replica's /metrics (served on a free port) on its node's known port."""
        if node_metrics is not None and node_metrics.port and self.server.metrics_address:
            self.node = NodeMetrics.join(
                node_metrics, self.server.replica_id, self.server.metrics.registry,
                self.server.metrics_address,
            )  # fmt: skip

    async def check_health(self) -> None:
        if self.server.app.draining:
            raise RuntimeError("draining")

    async def address_of(self) -> str:
        return self.address

    async def __del__(self) -> None:
        await self.server.stop(drain_s=self.drain_s)
        if self.node is not None:
            await asyncio.to_thread(self.node.close)


def _on_assigned_gpu(config: ReplicaConfig) -> ReplicaConfig:
    if config.engine.device == "cpu":
        return config
    return dataclasses.replace(
        config, engine=dataclasses.replace(config.engine, device=_assigned_gpu())
    )


@serve.deployment(health_check_period_s=5, health_check_timeout_s=30)
class EngineReplica(_ServedReplica):
    """One prefill, decode or colocated server (engine + gRPC port) inside a Serve replica."""

    async def __init__(
        self, config: ReplicaConfig, node_metrics: NodeMetricsConfig | None = None
    ) -> None:
        from services.config import build_engine

        config = _on_assigned_gpu(config)
        engine = await asyncio.to_thread(build_engine, config)
        if isinstance(config, PrefillConfig):
            from services.prefill import PrefillServer

            self.server = PrefillServer(config, engine)
        else:
            from services.decode import DecodeServer

            assert isinstance(config, DecodeConfig)
            self.server = DecodeServer(config, engine)
        self.address = await self.server.start()
        self._join_node(node_metrics)
        log.info("%s replica of %s serving on %s", config.role, config.name, self.address)


@serve.deployment(health_check_period_s=5, health_check_timeout_s=30)
class AttentionReplica(_ServedReplica):
    """One attention server (a KV pool lent to decoders, no engine) inside a Serve replica. It
    announces itself in the lending ledger; decoders borrow from it on demand, so it needs no
    start order with them."""

    drain_s = 5

    async def __init__(
        self, config: AttentionConfig, node_metrics: NodeMetricsConfig | None = None
    ) -> None:
        from services.attention import AttentionServer

        config = _on_assigned_gpu(config)
        assert isinstance(config, AttentionConfig)
        self.server = AttentionServer(config)  # allocates the pool: quick, no weights
        self.address = await self.server.start()
        self._join_node(node_metrics)
        log.info("attention replica of %s serving on %s", config.name, self.address)


@serve.deployment(health_check_period_s=5, health_check_timeout_s=30)
class EmbedReplica(_ServedReplica):
    """One embedding server (services.embed) inside a Serve replica: IC-Cache's router embeds
    requests through it, finding it in the registry."""

    drain_s = 5

    async def __init__(self, plan: EmbedPlan) -> None:
        from services.embed import EmbedServer

        self.server = await asyncio.to_thread(
            EmbedServer, plan.model_dir, plan.host, 0, plan.cluster, plan.name, plan.threads
        )
        self.address = await self.server.start()
        log.info("embed replica of %s serving on %s", plan.name, self.address)


def _assigned_gpu() -> str:
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

    async def __init__(
        self, config: RouterConfig, *workers: Any, node_metrics: NodeMetricsConfig | None = None
    ) -> None:
        import uuid

        from router.server import RouterServer

        self.workers = workers  # held so Serve deploys them with the router
        # gRPC channels and Redis clients belong to this replica's event loop: made here.
        self.router = RouterServer(config)
        await self.router.start()
        self.node: NodeMetrics | None = None
        self._endpoint: Any = None
        if node_metrics is not None and node_metrics.port:
            registry = self.router.metrics.registry
            address, self._endpoint = serve_registry(registry)
            name = f"router-{uuid.uuid4().hex[:8]}"
            self.node = NodeMetrics.join(node_metrics, name, registry, address)

    def __serve_build_asgi_app__(self):
        return self.router.asgi

    async def __del__(self) -> None:
        await self.router.stop()
        if self.node is not None:
            await asyncio.to_thread(self.node.close)
        if self._endpoint is not None:
            httpd, _ = self._endpoint
            httpd.shutdown()
            httpd.server_close()


def build_application(
    cfg: AppConfig, redis_url: str, model_dirs: dict[str, Path], embed_dir: Path | None = None
):
    """The Serve application for `cfg`; model_dirs maps model names to resolved directories;
    embed_dir: the embedding model's (a config with an iccache section)."""
    plan = plan_deployment(cfg, redis_url, model_dirs, _bind_host(), embed_dir)
    node_metrics = NodeMetricsConfig(
        cfg.metrics.port, scope=f"{cfg.namespace} {redis_url}", host=_bind_host()
    )
    workers = []
    for r in plan.replicas:
        side = r.spec
        actor: dict[str, Any] = {"num_cpus": side.num_cpus, "num_gpus": side.num_gpus}
        if side.num_gpus > 0:
            # Every GPU of the node stays visible (the replica picks its own from
            # ray.get_gpu_ids()), so a decode replica can open a prefill replica's CUDA IPC
            # handle and copy its KV GPU to GPU; with Ray's default, each replica sees only
            # its own GPU and the hand-off falls back to host memory.
            actor["runtime_env"] = {"env_vars": {NOSET_CUDA_VISIBLE: "1"}}
        opts: dict[str, Any] = {"name": r.name, "ray_actor_options": actor}
        if side.autoscaling is not None:
            opts["autoscaling_config"] = side.autoscaling.model_dump()
        else:
            opts["num_replicas"] = side.replicas
        replica = AttentionReplica if r.role == "attention" else EngineReplica
        workers.append(replica.options(**opts).bind(r.config, node_metrics))
    if plan.embed is not None:
        e = plan.embed.spec
        workers.append(
            EmbedReplica.options(
                name="embed", num_replicas=e.replicas, ray_actor_options={"num_cpus": e.num_cpus}
            ).bind(plan.embed)
        )
    router_actor: dict[str, Any] = {"num_cpus": cfg.router.num_cpus}
    if cfg.router.resources:
        router_actor["resources"] = dict(cfg.router.resources)
    return RouterReplica.options(
        name="router",
        num_replicas=cfg.router.replicas,
        max_ongoing_requests=cfg.router.max_ongoing_requests,
        ray_actor_options=router_actor,
    ).bind(plan.router, *workers, node_metrics=node_metrics)
