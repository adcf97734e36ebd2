"""What every splitserve gRPC server shares: one port, health and reflection for its services,
and a graceful drain (NOT_SERVING first, then in-flight work finishes)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Iterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kvstore.server import GRPC_OPTIONS, bracket


class ServiceApp:
    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.server = grpc.aio.server(options=GRPC_OPTIONS)
        bound = self.server.add_insecure_port(f"{bracket(host)}:{port}")
        if bound == 0:
            raise OSError(f"could not bind {host}:{port}")
        self.address = f"{bracket(host)}:{bound}"
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.services: list[str] = []
        self.draining = False
        self.inflight = 0

    def add(self, service_name: str) -> None:
        self.services.append(service_name)

    async def start(self) -> None:
        names = (*self.services, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name)
        reflection.enable_server_reflection((*names, reflection.SERVICE_NAME), self.server)
        await self.server.start()
        for name in ("", *self.services):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def admit(self, context, role: str, served: str, requested: str, refused) -> None:
        """Refuse a call while draining (UNAVAILABLE) or for a model this server doesn't serve
        (INVALID_ARGUMENT); refused(status) records the refusal before the abort."""
        if self.draining:
            refused("unavailable")
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"this {role} server is draining")
        if requested and requested != served:
            refused("invalid_argument")
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"unknown model {requested!r}; this server serves {served!r}",
            )

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        """Count a call as in flight (the drain waits for these)."""
        self.inflight += 1
        try:
            yield
        finally:
            self.inflight -= 1

    async def drain(self, timeout_s: float = 30.0) -> bool:
        """Refuse new work (health NOT_SERVING, calls UNAVAILABLE), let in-flight calls finish.
        True if everything finished in time."""
        self.draining = True
        for name in ("", *self.services):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        deadline = time.monotonic() + timeout_s
        while self.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.inflight == 0

    async def stop(self, grace: float = 1.0) -> None:
        await self.server.stop(grace)


async def run_until_signal(start, stop, announce) -> None:
    """Start, print the address, serve until SIGTERM/SIGINT, then stop (which drains)."""
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, done.set)
    announce(await start())
    await done.wait()
    await stop()
