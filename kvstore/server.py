"""The block server: a gRPC KVStore service over one BlockStore, registered in the Redis index.

splitserve serve kvstore --port 0 --redis URL --memory 4GiB --disk DIR:20GiB
"""

from __future__ import annotations

import asyncio
import socket
import threading
import uuid
from pathlib import Path

import grpc

from kvstore.block_store import BlockStore
from kvstore.config import KVStoreConfig
from kvstore.device_pool import DevicePool
from kvstore.index import RedisIndex
from kvstore.servicer import SERVICE_NAME, KVStoreServicer, add_kvstore_servicer
from kvstore.shm_layout import SharedMemoryLayout, default_shm_root, host_id
from rpc.server import ServiceApp


class KVStoreServer:
    """A block server: the KVStore service over one BlockStore, a heartbeat thread and
    (with a Redis URL) its entries in the index. It serves on a port of its own (start), or on
    another server's port (attach + begin: a prefill replica's shard)."""

    def __init__(self, config: KVStoreConfig, device_pool: DevicePool | None = None) -> None:
        """device_pool: GPU hand-off buffers that same-host readers copy GPU to GPU."""
        self.config = config
        self.device_pool = device_pool
        self.holder_id = config.holder_id or f"kv-{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        shm = config.shm
        root = (
            shm
            if isinstance(shm, Path)
            else (default_shm_root(self.holder_id, config.memory_bytes) if shm else None)
        )
        self.shm = SharedMemoryLayout(root) if root else None
        if self.shm:
            self.shm.create(self.holder_id)
        disk = (config.disk.path, config.disk.capacity_bytes) if config.disk else None
        self.store = BlockStore(
            self.holder_id,
            config.memory_bytes,
            disk,
            self.shm.blocks if self.shm else None,
            config.lend_fraction,
        )
        self.index: RedisIndex | None = None
        self.address = ""
        self.app: ServiceApp | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _capacity(self) -> dict[str, int]:
        s = self.store.stats()
        return {
            "mem_capacity": s.memory_capacity,
            "mem_used": s.memory_used,
            "disk_capacity": s.disk_capacity,
            "disk_used": s.disk_used,
            "lend_capacity": s.lend_capacity,
            "lent": s.lent_bytes,
        }

    def attach(self, server: grpc.aio.Server, address: str) -> str:
        """Serve KVStore on a server someone else owns (a prefill or decode process's own gRPC
        server), reachable at `address`. Returns the service name (for health/reflection)."""
        self.address = address
        cluster = self.config.cluster
        if cluster.redis_url:
            info = {
                "address": self.address,
                "host_id": host_id(),
                "shm_dir": str(self.shm.root) if self.shm else "",
            }
            self.index = RedisIndex(
                cluster.redis_url,
                self.holder_id,
                info,
                self.store.held,
                self._capacity,
                cluster.namespace,
                cluster.ttl_s,
            )
            self.store.sink = self.index
        servicer = KVStoreServicer(
            self.store, self.index, self.shm, self.config.max_block_bytes, self.device_pool
        )
        add_kvstore_servicer(servicer, server)
        return SERVICE_NAME

    async def begin(self) -> None:
        """Once the server is up: adopt disk blocks, register, start heartbeats."""
        self.store.adopt_disk()
        if self.index is not None:
            await asyncio.to_thread(self.index.heartbeat)
            self._beat = threading.Thread(target=self._heartbeat_loop, daemon=True)
            self._beat.start()

    async def start(self) -> str:
        """Serve on a port of its own; healthy once registered."""
        self.app = ServiceApp(self.config.host, self.config.port)
        self.app.add(self.attach(self.app.server, self.app.address))
        await self.app.start(serving=False)
        await self.begin()
        await self.app.set_serving()
        return self.address

    def _heartbeat_loop(self) -> None:
        n = 0
        while not self._stop.wait(self.config.cluster.heartbeat_s):
            assert self.index is not None
            if self.index.heartbeat():
                n += 1
                if n % 5 == 0:
                    self.index.janitor()

    async def stop(self, grace: float = 2.0) -> None:
        self._stop.set()
        if self.index is not None:
            await asyncio.to_thread(self.index.deregister)
        if self.app is not None:
            await self.app.stop(grace)
        if self._beat is not None:
            self._beat.join(timeout=5)
        self.store.close()
        if self.shm is not None:
            self.shm.release()

    async def wait(self) -> None:
        assert self.app is not None
        await self.app.server.wait_for_termination()
