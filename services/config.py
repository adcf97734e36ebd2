"""Typed configuration of the engine servers: what a prefill, decode or colocated replica runs
(its model and EngineConfig), where it listens, how it joins the cluster, and its own knobs.

Built once where the deployment is described (the app config, the `serve` command's flags) and
handed as is to the server, in this process or across Ray. Frozen, validated at construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kvstore.config import DiskTier, KVStoreConfig, Membership
from services.engine.config import EngineConfig


@dataclass(frozen=True, kw_only=True)
class ReplicaConfig:
    """What every engine replica has. name: the model name clients ask for; model: its
    directory; replica_id None: one is made (role-xxxxxxxx). metrics_port: /metrics over HTTP
    (None: off, 0: any free port). cpu_threads: torch threads of a CPU engine (0: leave torch's
    default)."""

    name: str
    model: Path
    engine: EngineConfig = field(default_factory=EngineConfig)
    host: str = "127.0.0.1"
    port: int = 0
    cluster: Membership = field(default_factory=Membership)
    max_waiting: int = 256
    replica_id: str | None = None
    metrics_port: int | None = None
    cpu_threads: int = 0

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("name (the served model name) must be non-empty")
        object.__setattr__(self, "model", Path(self.model))
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be within [0, 65535], got {self.port}")
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {self.max_waiting}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be within [0, 65535], got {self.metrics_port}")
        if self.cpu_threads < 0:
            raise ValueError(f"cpu_threads must be >= 0, got {self.cpu_threads}")

    @property
    def role(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True, kw_only=True)
class PrefillConfig(ReplicaConfig):
    """A prefill replica keeps each request's KV in its own shard (kv_memory_bytes, on disk past
    that) pinned for pin_lease_ms or until decode pulls it. device_pool_bytes: on a GPU, the
    hand-off buffer that same-host decoders copy GPU to GPU (None: 2 GiB on CUDA; 0: off)."""

    kv_memory_bytes: int = 1 << 30
    kv_disk: DiskTier | None = None
    device_pool_bytes: int | None = None
    pin_lease_ms: int = 30_000

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kv_memory_bytes <= 0:
            raise ValueError(f"kv_memory_bytes must be positive, got {self.kv_memory_bytes}")
        if self.device_pool_bytes is not None and self.device_pool_bytes < 0:
            raise ValueError(f"device_pool_bytes must be >= 0, got {self.device_pool_bytes}")
        if self.pin_lease_ms <= 0:
            raise ValueError(f"pin_lease_ms must be positive, got {self.pin_lease_ms}")

    @property
    def role(self) -> str:
        return "prefill"

    def shard(self, holder_id: str) -> KVStoreConfig:
        """The replica's KV shard: served on the replica's own port, under its replica id."""
        return KVStoreConfig(
            memory_bytes=self.kv_memory_bytes,
            disk=self.kv_disk,
            holder_id=holder_id,
            cluster=self.cluster,
        )


@dataclass(frozen=True, kw_only=True)
class DecodeConfig(ReplicaConfig):
    """A decode replica continues prefilled requests; colocated, it also takes whole requests
    (the baseline disaggregation is measured against). borrow_kv: when its KV pool is short it
    borrows blocks from attention replicas and attends over them there."""

    colocated: bool = False
    # Borrow KV blocks from attention replicas (found in the cluster's lending ledger) when
    # the engine's own pool is short, and attend over them there (DistAttention).
    borrow_kv: bool = False
    # Lend up to this share of the engine's KV pool, while this replica's own work leaves it
    # free, to other decode replicas that borrow (0: lend nothing).
    lend_fraction: float = 0.0
    # Attention offload (engine.kv_offload): this many attention workers of the model hold the
    # KV heads of this replica's pool, one range each (found in the registry).
    offload_workers: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.offload_workers > 0) != self.engine.kv_offload:
            raise ValueError("offload_workers > 0 and engine.kv_offload go together")
        if self.offload_workers and not self.cluster.redis_url:
            raise ValueError("offload needs the cluster's Redis (where attention workers are)")
        if self.borrow_kv and not self.cluster.redis_url:
            raise ValueError("borrow_kv needs the cluster's Redis (the lending ledger)")
        if not 0.0 <= self.lend_fraction <= 1.0:
            raise ValueError(f"lend_fraction must be within [0, 1], got {self.lend_fraction}")
        if self.lend_fraction and not self.cluster.redis_url:
            raise ValueError("lend_fraction needs the cluster's Redis (the lending ledger)")

    @property
    def role(self) -> str:
        return "colocated" if self.colocated else "decode"


def build_engine(config: ReplicaConfig):
    """The replica's engine, on its device (call it off the event loop: loading takes a while).

    The current CUDA device is per thread: kernels launched while building (graph capture,
    warm-up) must run on the engine's own GPU, so the building thread selects it first."""
    import torch

    from services.engine.engine import LLMEngine

    if config.engine.device.startswith("cuda:"):
        torch.cuda.set_device(config.engine.device)
    elif config.engine.device == "cpu" and config.cpu_threads:
        torch.set_num_threads(config.cpu_threads)
    return LLMEngine(config.model, config.engine)


@dataclass(frozen=True, kw_only=True)
class AttentionConfig(ReplicaConfig):
    """An attention replica: a KV pool of the model's layout (no weights) that lends blocks to
    decode replicas and attends over them. Its pool is engine.num_kv_blocks blocks, or
    engine.kv_cache_memory_bytes worth; lend_fraction of it may be lent (the rest is kept for
    its own sequences: none yet, so 1.0 by default). offload: instead of lending, hold KV head
    ranges of model workers' pools in attention offload (that much memory in all)."""

    lend_fraction: float = 1.0
    offload: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.lend_fraction <= 1.0:
            raise ValueError(f"lend_fraction must be within [0, 1], got {self.lend_fraction}")

    @property
    def role(self) -> str:
        return "attention"
