"""The router process's parts from its RouterConfig: the pool backend, each model's tokenizer,
the tenants, the OpenAI-compatible ASGI app and the gRPC Generate service.

    router = RouterServer(config)
    await router.start()       # inside the event loop that will serve (gRPC and Redis clients)
    app = router.asgi          # serve it with Ray Serve's ingress or any ASGI server
    ...
    await router.stop()

HTTP and gRPC share one Tenants object, so a tenant's limits count both.
"""

from __future__ import annotations

import logging

from protos.splitserve.v1 import generate_pb2_grpc
from router.app import build_app
from router.backend import PoolBackend
from router.config import RouterConfig
from router.grpc_api import SERVICE_NAME, GenerateServicer
from router.metrics import RouterMetrics
from router.tenants import Tenants
from rpc.server import ServiceApp
from services.engine.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


class RouterServer:
    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.tokenizers = {
            m.name: load_tokenizer(m.model_dir, tokenizer_class=m.tokenizer_class)
            for m in config.models
        }
        self.tenants = Tenants.load(config.tenants_file) if config.auth else None
        self.metrics = RouterMetrics(self.tenants)
        self.backend: PoolBackend | None = None
        self.grpc: ServiceApp | None = None
        self.grpc_address: str | None = None

    async def start(self) -> None:
        cfg = self.config
        self.backend = PoolBackend(cfg)
        defaults = {m.name: m.defaults for m in cfg.models}
        self.asgi = build_app(
            self.backend,
            self.tokenizers,
            self.tenants,
            cfg.max_body_bytes,
            self.metrics,
            defaults=defaults,
        )
        if cfg.grpc_port is None:
            return
        try:
            # grpc sets SO_REUSEPORT: several router replicas on a host share the port.
            self.grpc = ServiceApp(cfg.grpc_host, cfg.grpc_port)
        except OSError as e:
            log.warning("gRPC Generate service not started: %s", e)
            return
        servicer = GenerateServicer(self.backend, self.tokenizers, self.tenants, defaults)
        generate_pb2_grpc.add_GenerateServicer_to_server(servicer, self.grpc.server)
        self.grpc.add(SERVICE_NAME)
        await self.grpc.start()
        self.grpc_address = self.grpc.address

    async def stop(self) -> None:
        if self.grpc is not None:
            await self.grpc.stop()
        if self.backend is not None:
            await self.backend.close()
