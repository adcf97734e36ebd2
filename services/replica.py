"""What every engine replica process shares: the engine on its loop thread, one gRPC port,
Prometheus metrics, and its entry in the service registry. PrefillServer and DecodeServer add
their servicer (and prefill its KV shard)."""

from __future__ import annotations

import uuid

from services.engine.engine import LLMEngine
from services.engine_loop import EngineLoop
from services.grpc_app import ServiceApp
from services.metrics import ServiceMetrics
from services.registry import Registration, register_replica


class ReplicaServer:
    def __init__(
        self,
        role: str,
        engine: LLMEngine,
        model_name: str,
        redis_url: str | None,
        host: str,
        port: int,
        namespace: str,
        max_waiting: int,
        replica_id: str | None,
        heartbeat_s: float,
        ttl_s: float,
        metrics_port: int | None,
    ) -> None:
        self.role = role
        self.engine = engine
        self.model_name = model_name
        self.redis_url = redis_url
        self.namespace = namespace
        self.replica_id = replica_id or f"{role}-{uuid.uuid4().hex[:8]}"
        self.loop = EngineLoop(engine, max_waiting)
        self.registration: Registration | None = None
        self._bind = (host, port)
        self._ttl = (heartbeat_s, ttl_s)
        self.app: ServiceApp
        self.metrics = ServiceMetrics(role, model_name, self.loop)
        self._metrics_port = metrics_port  # /metrics over HTTP: None off, 0 a free port
        self.metrics_address: str | None = None

    @property
    def address(self) -> str:
        return self.app.address

    def _announce(self, holder_id: str = "") -> None:
        """Once serving: /metrics (if asked for) and the registry entry routers look for."""
        if self._metrics_port is not None:
            self.metrics_address = self.metrics.serve(self._bind[0], self._metrics_port)
        if self.redis_url:
            self.registration = register_replica(
                self.redis_url,
                self.role,
                self.replica_id,
                model=self.model_name,
                address=self.address,
                load=lambda: self.loop.load().as_dict(),
                holder_id=holder_id,
                metrics_address=self.metrics_address or "",
                ns=self.namespace,
                heartbeat_s=self._ttl[0],
                ttl_s=self._ttl[1],
            )

    def _leave_registry(self) -> None:
        if self.registration is not None:
            self.registration.close()

    async def _close(self) -> None:
        await self.app.stop()
        await self.metrics.aclose()
        self.loop.stop()
