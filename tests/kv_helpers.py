"""Pieces of the KV store tests: real servers on loopback, in-process or as subprocesses."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

from kvstore.block import StoredBlock, TensorSpec
from kvstore.config import KVStoreConfig, Membership
from kvstore.server import KVStoreServer


def make_blocks(n: int, size: int = 4096, seed: int = 0, model: str = "m") -> list[StoredBlock]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        payload = rng.randbytes(size)
        out.append(
            StoredBlock.build(
                rng.randbytes(16), model, payload, [TensorSpec("uint8", (size,))], (1, 2, 3)
            )
        )
    return out


class LoopThread:
    """An event loop in a background thread hosting in-process servers, so tests can drive
    clients from their own loop (or blocking code) as a separate process would."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.servers: list[KVStoreServer] = []

    def run(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def server(
        self,
        redis_url: str | None = None,
        namespace: str = "splitserve",
        device_pool=None,
        heartbeat_s: float = 0.25,
        ttl_s: float = 1.5,
        **kw,
    ) -> KVStoreServer:
        """A holder on this loop; kw: KVStoreConfig fields. Fast heartbeats by default, so
        index changes show within a test's patience."""
        kw.setdefault("memory_bytes", 64 << 20)
        cluster = Membership(
            redis_url=redis_url, namespace=namespace, heartbeat_s=heartbeat_s, ttl_s=ttl_s
        )
        s = KVStoreServer(KVStoreConfig(cluster=cluster, **kw), device_pool)
        self.run(s.start())
        self.servers.append(s)
        return s

    def stop(self, s: KVStoreServer) -> None:
        self.run(s.stop(grace=0.5))
        self.servers.remove(s)

    def close(self) -> None:
        for s in list(self.servers):
            self.stop(s)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()


def spawn_holder(redis_url: str, holder_id: str, *args: str) -> tuple[subprocess.Popen, str]:
    """A holder in its own process (for kill -9); returns it and the address it printed."""
    cmd = [sys.executable, "-m", "splitserve.cli", "serve", "kvstore", "--redis", redis_url,
           "--holder-id", holder_id, *args]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 60
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line or time.monotonic() > deadline:
        proc.kill()
        raise RuntimeError(f"holder did not start: {proc.stderr.read() if proc.stderr else ''}")
    return proc, line


def wait_for(pred, timeout: float = 10.0, interval: float = 0.05) -> float:
    """Poll pred until true; returns the seconds it took. Bounded."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return time.monotonic() - t0
        time.sleep(interval)
    raise AssertionError(f"condition not met in {timeout} s")


__all__ = ["LoopThread", "Path", "make_blocks", "spawn_holder", "wait_for"]
