"""The running `splitserve up` the chaos benchmark breaks: its replicas, its private Redis
server, its metrics, and whether it is whole again after a fault."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import httpx
import redis
from prometheus_client.parser import text_string_to_metric_families

from bench.up_process import Up, listening_pid, redis_pid
from kvstore.registry import Replica, list_replicas

MODEL = "tiny"


@dataclass
class System:
    up: Up
    grpc: str  # host:port of gRPC Generate
    metrics_port: int  # the node's /metrics (every replica's series, labelled by replica)

    @property
    def url(self) -> str:
        return self.up.url

    @property
    def redis_url(self) -> str:
        url = self.up.redis
        assert url, "splitserve up did not say where its private Redis server is"
        return url

    def replicas(self, role: str) -> list[Replica]:
        try:
            return list_replicas(self.redis_url, role, MODEL)
        except redis.RedisError:
            return []

    def replica_pid(self, role: str) -> tuple[int, Replica]:
        """The process of the (first) live replica of a role, by the port it serves on."""
        reps = self.replicas(role)
        if not reps:
            raise LookupError(f"no live {role} replica is registered")
        rep = reps[0]
        return listening_pid(int(rep.address.rsplit(":", 1)[1])), rep

    def redis_pid(self) -> int:
        return redis_pid(self.up.proc.pid, self.redis_url)

    def flushall(self) -> None:
        with redis.Redis.from_url(self.redis_url, socket_timeout=5) as r:
            r.flushall()

    # -- metrics ---------------------------------------------------------------------------

    def router_counter(self, name: str) -> float:
        """A router counter's total over its labels (splitserve:requests_resumed...)."""
        return sum(_samples(self.url + "/metrics", name + "_total").values())

    def replica_counter(self, name: str, role: str) -> dict[str, float]:
        """A replica counter per replica of a role, from the node's /metrics."""
        if not self.metrics_port:
            return {}
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        got = _samples(url, name + "_total", role=role)
        return {k[0]: v for k, v in got.items()}

    # -- health ----------------------------------------------------------------------------

    def whole(self) -> bool:
        """Serving as before the fault: /health ok and both roles registered."""
        try:
            h = httpx.get(self.url + "/health", timeout=5)
        except httpx.HTTPError:
            return False
        ok = h.status_code == 200 and h.json().get("status") == "ok"
        return ok and bool(self.replicas("prefill")) and bool(self.replicas("decode"))

    async def wait_whole(self, timeout_s: float) -> float | None:
        """Seconds until whole (None: not within timeout_s)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if await asyncio.to_thread(self.whole):
                return time.monotonic() - t0
            await asyncio.sleep(0.2)
        return None


def _samples(url: str, sample: str, **match: str) -> dict[tuple, float]:
    """{(replica label,): value} of the samples named `sample` whose labels match."""
    try:
        text = httpx.get(url, timeout=30).text
    except httpx.HTTPError:
        return {}
    out: dict[tuple, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in match.items()):
                key = (s.labels.get("replica", ""),)
                out[key] = out.get(key, 0.0) + s.value
    return out


def counter_delta(before: dict[str, float], after: dict[str, float]) -> float:
    """What per-replica counters grew by: a replica that appeared counts from zero, one that
    is gone counts nothing (its last increments are lost with it: a lower bound then)."""
    return sum(v - before.get(k, 0.0) for k, v in after.items())
