"""Typed configuration of a block server, and how any server joins the cluster.

Frozen and validated at construction: a bad value fails where the config is built (the app
config's load, the CLI's flags), with the field named, not later inside a running replica.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True, kw_only=True)
class Membership:
    """The Redis a server announces itself in (the KV index, the service registry) and how it
    stays alive there: a heartbeat every heartbeat_s renews a registration that lapses after
    ttl_s. redis_url None: a standalone server, in no index and no registry."""

    redis_url: str | None = None
    namespace: str = "splitserve"
    heartbeat_s: float = 1.0
    ttl_s: float = 5.0

    def __post_init__(self) -> None:
        if not self.namespace or ":" in self.namespace:
            raise ValueError(f"namespace must be non-empty without ':', got {self.namespace!r}")
        if self.heartbeat_s <= 0:
            raise ValueError(f"heartbeat_s must be positive, got {self.heartbeat_s}")
        if self.ttl_s <= self.heartbeat_s:
            raise ValueError(
                f"ttl_s must exceed heartbeat_s ({self.heartbeat_s}), got {self.ttl_s}: a live "
                "server would drop out between two heartbeats"
            )


@dataclass(frozen=True)
class DiskTier:
    path: Path
    capacity_bytes: int

    def __post_init__(self) -> None:
        if self.capacity_bytes <= 0:
            raise ValueError(f"disk capacity must be positive, got {self.capacity_bytes}")


@dataclass(frozen=True, kw_only=True)
class KVStoreConfig:
    """One holder: its tiers, how much of its memory it lends, where it listens.

    shm: serve same-host readers and writers through a tmpfs directory (True: /dev/shm when it
    can hold memory_bytes; a Path: that directory; False: bytes through the stream only).
    A shard attached to another server's port (a prefill replica's) takes that server's
    address; host and port are then unused."""

    memory_bytes: int = 1 << 30
    disk: DiskTier | None = None
    lend_fraction: float = 0.5
    max_block_bytes: int = 256 << 20
    shm: bool | Path = True
    holder_id: str | None = None
    host: str = "127.0.0.1"
    port: int = 0
    cluster: Membership = field(default_factory=Membership)

    def __post_init__(self) -> None:
        if self.memory_bytes <= 0:
            raise ValueError(f"memory_bytes must be positive, got {self.memory_bytes}")
        if not 0.0 <= self.lend_fraction <= 1.0:
            raise ValueError(f"lend_fraction must be within [0, 1], got {self.lend_fraction}")
        if self.max_block_bytes <= 0:
            raise ValueError(f"max_block_bytes must be positive, got {self.max_block_bytes}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be within [0, 65535], got {self.port}")
