"""Service replicas in Redis: who serves which role and model, where, and how loaded.

  NS:svc:<role>               SET  replica ids
  NS:svc:<role>:<replica id>  HASH role, model, address, holder_id, running, waiting,
                                   free_blocks, total_blocks; TTL = liveness (heartbeat renews)

Replicas (prefill, decode, colocated, attention) write their entry; the router reads them to
place requests. A replica that dies drops out when its TTL ends. This sits beside the KV index
because both are the cluster's membership in Redis, with the same heartbeat-and-TTL rule.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import redis

from kvstore.config import Membership

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Replica:
    replica_id: str
    role: str
    model: str
    address: str
    holder_id: str
    running: int
    waiting: int
    free_blocks: int
    total_blocks: int
    metrics_address: str = ""  # host:port of its /metrics, where it serves one


class Registration:
    """This replica's entry, kept alive by a heartbeat thread until `close`."""

    def __init__(
        self,
        cluster: Membership,
        role: str,
        replica_id: str,
        info: dict[str, str],
        load: Callable[[], dict[str, int]],
    ) -> None:
        if not cluster.redis_url:
            raise ValueError("a registration needs the cluster's Redis URL")
        self.r = redis.Redis.from_url(
            cluster.redis_url, socket_timeout=1.0, socket_connect_timeout=1.0
        )
        ns = cluster.namespace
        self.key = f"{ns}:svc:{role}:{replica_id}"
        self.set_key = f"{ns}:svc:{role}"
        self.replica_id = replica_id
        self.info = {"role": role, **info}
        self.load = load
        self.heartbeat_s = cluster.heartbeat_s
        self.ttl_ms = int(cluster.ttl_s * 1000)
        self._stop = threading.Event()
        self.beat()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def beat(self) -> None:
        try:
            p = self.r.pipeline(transaction=False)
            p.hset(self.key, mapping={**self.info, **self.load()})
            p.pexpire(self.key, self.ttl_ms)
            p.sadd(self.set_key, self.replica_id)
            p.execute()
        except redis.RedisError as e:  # Redis down: the next beat re-registers
            log.warning("registration heartbeat failed: %s", e)

    def _loop(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self.beat()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with contextlib.suppress(redis.RedisError):
            p = self.r.pipeline(transaction=False)
            p.delete(self.key)
            p.srem(self.set_key, self.replica_id)
            p.execute()
        self.r.close()


def register_replica(
    cluster: Membership,
    role: str,
    replica_id: str,
    *,
    model: str,
    address: str,
    load: Callable[[], dict[str, int]],
    holder_id: str = "",
    metrics_address: str = "",
) -> Registration:
    """A prefill/decode/colocated replica's entry, as the router reads it."""
    info = {
        "model": model,
        "address": address,
        "holder_id": holder_id,
        "metrics_address": metrics_address,
    }
    return Registration(cluster, role, replica_id, info, load)


def list_replicas(url: str, role: str, model: str | None = None, ns: str = "splitserve"):
    """Live replicas of a role (optionally serving `model`)."""
    r = redis.Redis.from_url(url, decode_responses=True, socket_timeout=2.0)
    try:
        ids = sorted(r.smembers(f"{ns}:svc:{role}"))
        p = r.pipeline(transaction=False)
        for rid in ids:
            p.hgetall(f"{ns}:svc:{role}:{rid}")
        out = []
        for rid, h in zip(ids, p.execute() if ids else [], strict=True):
            if not h or (model is not None and h.get("model") != model):
                continue
            ints = {k: int(h.get(k, 0)) for k in ("running", "waiting", "free_blocks",
                                                   "total_blocks")}  # fmt: skip
            out.append(Replica(rid, h.get("role", role), h.get("model", ""), h.get("address", ""),
                               h.get("holder_id", ""), **ints,
                               metrics_address=h.get("metrics_address", "")))  # fmt: skip
        return out
    finally:
        r.close()
