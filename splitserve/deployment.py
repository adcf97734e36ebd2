"""What runs where: the typed configs of every server, built once from the app config.

The app config (splitserve.app_config) is what a user writes; these are what the servers take:
a RouterConfig, and per model and role a PrefillConfig, DecodeConfig or AttentionConfig holding
its EngineConfig.
`splitserve up` and the Helm chart's RayService hand them to Ray replicas as they are."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from kvstore.config import Membership
from kvstore.sizes import parse_size
from router.config import ModelRoute, RouterConfig
from services.config import AttentionConfig, DecodeConfig, PrefillConfig, ReplicaConfig
from splitserve.app_config import AppConfig, ModelSpec, Placement, ReplicaSpec
from splitserve.iccache_spec import EmbedSpec


@dataclass(frozen=True)
class ReplicaPlan:
    """One Serve deployment of a model's replicas (engine or attention): its role, its
    placement (Ray resources, replicas or autoscaling) and the config every replica of it runs."""

    role: str
    model: str
    spec: Placement
    config: ReplicaConfig

    @property
    def name(self) -> str:
        return f"{self.role}-{self.model}"


@dataclass(frozen=True)
class EmbedPlan:
    """The embedding replicas IC-Cache's router asks (services.embed): their placement and
    what each runs. They register under `name` in the cluster's registry."""

    spec: EmbedSpec
    model_dir: Path
    name: str
    cluster: Membership
    host: str
    threads: int


@dataclass(frozen=True)
class Deployment:
    router: RouterConfig
    replicas: tuple[ReplicaPlan, ...]
    embed: EmbedPlan | None = None


def plan_deployment(
    cfg: AppConfig, redis_url: str, model_dirs: dict[str, Path], bind_host: str = "127.0.0.1",
    embed_dir: Path | None = None,
) -> Deployment:  # fmt: skip
    """model_dirs: each model's resolved directory. bind_host: where replicas listen (0.0.0.0
    in a cluster, so replicas on other nodes reach them). embed_dir: the embedding model's
    resolved directory (a config with an iccache section needs it)."""
    from services.engine.block_hash import model_fingerprint
    from services.engine.config import ModelConfig
    from services.engine.tokenizer import load_tokenizer

    cluster = Membership(redis_url=redis_url, namespace=cfg.namespace)
    routes, replicas = [], []
    for m in cfg.models:
        d = model_dirs[m.name]
        # Block size and context are the same every role.
        engine = m.engine_config(m.serving_roles[0])
        routes.append(
            ModelRoute(
                name=m.name,
                model_dir=str(d),
                model_id=model_fingerprint(d),
                block_size=engine.block_size,
                max_model_len=(
                    engine.max_model_len or ModelConfig.from_dir(d).max_position_embeddings
                ),
                # The router sees offload's model workers as colocated (or decode) replicas.
                mode=(
                    "disaggregated" if m.offload_prefill else "colocated" if m.offload else m.mode
                ),
                tokenizer_class=load_tokenizer(d).class_name,
                defaults=m.sampling.over(d),
            )
        )
        for role in m.roles:
            replicas.append(
                ReplicaPlan(
                    role, m.name, m.side(role), replica_config(m, role, d, cluster, bind_host)
                )
            )
    embed, iccache = None, None
    if cfg.iccache is not None:
        if embed_dir is None:
            raise ValueError("iccache: the embedding model's directory was not resolved")
        es = cfg.iccache.embed
        embed = EmbedPlan(
            es, embed_dir, es.served_name, cluster, bind_host, es.threads or os.cpu_count() or 1
        )
        iccache = cfg.iccache.config(embed_dim=embed_width(embed_dir))
    router = RouterConfig(
        models=tuple(routes),
        cluster=cluster,
        auth=cfg.auth.enabled,
        tenants_file=cfg.auth.tenants_file,
        grpc_host=cfg.grpc.host,
        grpc_port=cfg.grpc.port,
        iccache=iccache,
        max_resumes=cfg.router.max_resumes,
        resume_wait_s=cfg.router.resume_wait_s,
        admission=cfg.router.admission.limits(),
    )
    return Deployment(router, tuple(replicas), embed)


def embed_width(model_dir: Path) -> int:
    """The width of a sentence-transformers model's vectors (its hidden size: mean pooling)."""
    import json

    return int(json.loads((model_dir / "config.json").read_text())["hidden_size"])


def offload_blocks(m: ModelSpec, model_dir: Path) -> int:
    """Blocks of each model worker's pool in mode offload: every attention worker splits its
    memory evenly among the model workers, and the widest KV head range bounds the count."""
    from services.engine.config import ModelConfig
    from services.engine.kv_cache import KVCache
    from services.engine.offload_plan import head_ranges

    assert m.attention is not None
    mcfg = ModelConfig.from_dir(model_dir)
    device = "cuda" if m.attention.num_gpus > 0 else "cpu"
    ecfg = m.engine_config("attention", device=device)
    per_block = KVCache.bytes_per_block(mcfg, ecfg.block_size, ecfg.resolve_dtype(mcfg))
    budget = (ecfg.num_kv_blocks or max(2, ecfg.kv_cache_memory_bytes // per_block)) * per_block
    try:
        widest = max(b - a for a, b in head_ranges(mcfg.num_kv_heads, m.attention.replicas))
    except ValueError as e:
        raise ValueError(f"model {m.name!r}: attention.replicas: {e}") from None
    replicas = getattr(m, m.model_worker_role).replicas
    blocks = budget // replicas * mcfg.num_kv_heads // (per_block * widest)
    if blocks < 2:
        raise ValueError(
            f"model {m.name!r}: the attention replicas' memory gives each of the "
            f"{replicas} model workers {blocks} blocks; raise attention.kv_memory"
        )
    return blocks


def replica_config(
    m: ModelSpec, role: str, model_dir: Path, cluster: Membership, host: str
) -> ReplicaConfig:
    """The config of one role's replicas. A GPU replica's engine names "cuda" here; the replica
    narrows it to the GPU Ray assigned it (splitserve.app). A model with attention replicas has
    decoders that borrow KV from them (borrow_kv)."""
    side = m.side(role)
    device = "cuda" if side.num_gpus > 0 else "cpu"
    # 0: every core (Ray would otherwise hold a 0-CPU replica's torch to one thread).
    threads = side.threads or os.cpu_count() or 1
    engine = m.engine_config(role, device=device)
    if device == "cpu":
        # By default only 4-bit weights: there a core less measured faster for one user;
        # float32's GEMV, twice the bytes a row, measured the same either way.
        auto = max(1, threads - 1) if engine.load_format == "gguf" else 0
        lone = auto if side.lone_threads is None else side.lone_threads
        lone = lone if lone < threads else 0
        engine = replace(engine, cpu_lone_step_threads=lone)
    common = {
        "name": m.name,
        "model": model_dir,
        "engine": engine,
        "host": host,
        "port": 0,
        "cluster": cluster,
        "metrics_port": 0,
        "cpu_threads": threads,
    }
    if role == "attention":
        assert m.attention is not None
        return AttentionConfig(**common, lend_fraction=m.attention.lend_fraction, offload=m.offload)
    assert isinstance(side, ReplicaSpec)
    common["max_waiting"] = side.max_waiting
    if m.offload and role == m.model_worker_role:
        blocks = offload_blocks(m, model_dir)
        common["engine"] = replace(common["engine"], kv_offload=True, num_kv_blocks=blocks)
        assert m.attention is not None
        return DecodeConfig(
            **common, colocated=role == "colocated", offload_workers=m.attention.replicas
        )
    if role == "prefill":
        return PrefillConfig(
            **common,
            kv_memory_bytes=parse_size(side.kv_memory),
            device_pool_bytes=parse_size(side.device_pool),
        )
    return DecodeConfig(
        **common, colocated=role == "colocated", borrow_kv=m.borrows_kv,
        lend_fraction=side.lend_fraction,
    )  # fmt: skip
