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
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kvstore.block_store import BlockStore
from kvstore.device_pool import DevicePool
from kvstore.index import RedisIndex
from kvstore.servicer import SERVICE_NAME, KVStoreServicer, add_kvstore_servicer
from kvstore.shm_layout import SharedMemoryLayout, default_shm_root, host_id

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


class KVStoreServer:
    """A block server: gRPC service, heartbeat thread and (optionally) the Redis index."""

    def __init__(
        self,
        memory_bytes: int,
        redis_url: str | None = None,
        disk: tuple[Path, int] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        holder_id: str | None = None,
        shm: bool | Path = True,
        lend_fraction: float = 0.5,
        max_block_bytes: int = 256 * 1024 * 1024,
        namespace: str = "splitserve",
        heartbeat_s: float = 1.0,
        ttl_s: float = 5.0,
        device_pool: DevicePool | None = None,
    ) -> None:
        self.device_pool = device_pool  # GPU hand-off buffers for same-host readers
        self.holder_id = holder_id or f"kv-{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        root = (
            shm
            if isinstance(shm, Path)
            else (default_shm_root(self.holder_id, memory_bytes) if shm else None)
        )
        self.shm = SharedMemoryLayout(root) if root else None
        if self.shm:
            self.shm.create(self.holder_id)
        self.store = BlockStore(
            self.holder_id,
            memory_bytes,
            disk,
            self.shm.blocks if self.shm else None,
            lend_fraction,
        )
        self.host, self.port = host, port
        self.redis_url = redis_url
        self.namespace = namespace
        self.heartbeat_s = heartbeat_s
        self.ttl_s = ttl_s
        self.max_block_bytes = max_block_bytes
        self.index: RedisIndex | None = None
        self.address = ""
        self._server: grpc.aio.Server | None = None
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
        if self.redis_url:
            info = {
                "address": self.address,
                "host_id": host_id(),
                "shm_dir": str(self.shm.root) if self.shm else "",
            }
            self.index = RedisIndex(
                self.redis_url,
                self.holder_id,
                info,
                self.store.held,
                self._capacity,
                self.namespace,
                self.ttl_s,
            )
            self.store.sink = self.index
        servicer = KVStoreServicer(
            self.store, self.index, self.shm, self.max_block_bytes, self.device_pool
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
        server = grpc.aio.server(options=GRPC_OPTIONS)
        self._server = server
        bound = server.add_insecure_port(f"{bracket(self.host)}:{self.port}")
        if bound == 0:
            raise OSError(f"could not bind {self.host}:{self.port}")
        self.port = bound
        self.attach(server, f"{bracket(self.host)}:{bound}")
        hs = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(hs, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME),
            server,
        )  # fmt: skip
        await server.start()
        await self.begin()
        await hs.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        await hs.set("", health_pb2.HealthCheckResponse.SERVING)
        self._hs = hs
        return self.address

    def _heartbeat_loop(self) -> None:
        n = 0
        while not self._stop.wait(self.heartbeat_s):
            assert self.index is not None
            if self.index.heartbeat():
                n += 1
                if n % 5 == 0:
                    self.index.janitor()

    async def stop(self, grace: float = 2.0) -> None:
        self._stop.set()
        if getattr(self, "_hs", None) is not None:
            await self._hs.enter_graceful_shutdown()
        if self.index is not None:
            await asyncio.to_thread(self.index.deregister)
        if self._server is not None:
            await self._server.stop(grace)
        if self._beat is not None:
            self._beat.join(timeout=5)
        self.store.close()
        if self.shm is not None:
            self.shm.release()

    async def wait(self) -> None:
        assert self._server is not None
        await self._server.wait_for_termination()


def bracket(host: str) -> str:
    """An address's host part: IPv6 literals go in brackets."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
