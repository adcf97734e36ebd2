"""What every engine replica process shares: the engine on its loop thread, one gRPC port,
Prometheus metrics, and its entry in the service registry. PrefillServer and DecodeServer add
their servicer (and prefill its KV shard)."""

from __future__ import annotations

import uuid

from kvstore.registry import Registration, register_replica
from rpc.server import ServiceApp
from services.config import ReplicaConfig, build_engine
from services.engine.engine import LLMEngine
from services.engine_loop import EngineLoop
from services.metrics import ServiceMetrics


class ReplicaServer:
    def __init__(self, config: ReplicaConfig, engine: LLMEngine | None = None) -> None:
        """engine: one already built from config.model and config.engine (tests share one);
        None builds it here."""
        self.config = config
        self.role = config.role
        self.engine = engine if engine is not None else build_engine(config)
        self.model_name = config.name
        self.replica_id = config.replica_id or f"{self.role}-{uuid.uuid4().hex[:8]}"
        self.loop = EngineLoop(self.engine, config.max_waiting)
        self.registration: Registration | None = None
        self.app: ServiceApp
        self.metrics = ServiceMetrics(self.role, self.model_name, self.loop)
        self.metrics_address: str | None = None

    @property
    def address(self) -> str:
        return self.app.address

    def _bind(self) -> ServiceApp:
        # The gRPC server belongs to the event loop that runs it: made in start(), not here.
        self.app = ServiceApp(self.config.host, self.config.port)
        return self.app

    def _announce(self, holder_id: str = "") -> None:
        """Once serving: /metrics (if asked for) and the registry entry routers look for."""
        cfg = self.config
        if cfg.metrics_port is not None:
            self.metrics_address = self.metrics.serve(cfg.host, cfg.metrics_port)
        if cfg.cluster.redis_url:
            self.registration = register_replica(
                cfg.cluster,
                self.role,
                self.replica_id,
                model=self.model_name,
                address=self.address,
                load=lambda: self.loop.load().as_dict(),
                holder_id=holder_id,
                metrics_address=self.metrics_address or "",
            )

    def _leave_registry(self) -> None:
        if self.registration is not None:
            self.registration.close()

    async def _close(self) -> None:
        await self.app.stop()
        await self.metrics.aclose()
        self.loop.stop()
