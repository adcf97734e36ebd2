"""What every splitserve gRPC server shares: one port, health and reflection for its services,
and a graceful drain (NOT_SERVING first, then in-flight work finishes, then stop).

    app = ServiceApp("127.0.0.1", 0)          # binds now; app.address is known
    add_FooServicer_to_server(servicer, app.server)
    app.add(FOO_SERVICE_NAME)
    await app.start()                          # health SERVING for "" and every added service
    ...
    await app.drain(30)                        # refuse new calls, let in-flight ones finish
    await app.stop()

Make it inside the event loop that will run it: a grpc.aio server belongs to one loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Awaitable, Callable, Iterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from rpc.channel import GRPC_OPTIONS, host_port

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


class ServiceApp:
    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.server = grpc.aio.server(options=GRPC_OPTIONS)
        bound = self.server.add_insecure_port(host_port(host, port))
        if bound == 0:
            raise OSError(f"could not bind {host_port(host, port)}")
        self.host, self.port = host, bound
        self.address = host_port(host, bound)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.services: list[str] = []
        self.draining = False
        self.inflight = 0

    def add(self, service_name: str) -> None:
        """Name a service added to self.server, for health and reflection."""
        self.services.append(service_name)

    async def start(self, serving: bool = True) -> None:
        """Start serving calls. serving=False leaves health NOT_SERVING until set_serving() (a
        server with work to do once the port is up, e.g. registering in an index)."""
        names = (*self.services, HEALTH_SERVICE, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self.server)
        await self.server.start()
        await self._set(
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )

    async def set_serving(self) -> None:
        await self._set(health_pb2.HealthCheckResponse.SERVING)

    async def _set(self, status) -> None:
        for name in ("", *self.services):
            await self.health.set(name, status)

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
        await self._set(health_pb2.HealthCheckResponse.NOT_SERVING)
        deadline = time.monotonic() + timeout_s
        while self.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.inflight == 0

    async def stop(self, grace: float = 1.0) -> None:
        """Health NOT_SERVING for good, then stop: calls still running get `grace` seconds."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


async def run_until_signal(
    start: Callable[[], Awaitable[str]],
    stop: Callable[[], Awaitable[object]],
    announce: Callable[[str], None],
) -> None:
    """Start, announce the address, serve until SIGTERM/SIGINT, then stop (which drains)."""
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, done.set)
    announce(await start())
    await done.wait()
    await stop()
