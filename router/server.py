"""The router process's parts from its RouterConfig: the pool backend, each model's tokenizer,
the tenants, the OpenAI-compatible ASGI app and the gRPC Generate service.

    router = RouterServer(config)
    await router.start()       # inside the event loop that will serve (gRPC and Redis clients)
    app = router.asgi          # serve it with Ray Serve's ingress or any ASGI server
    ...
    await router.stop()

HTTP and gRPC share one Tenants object and one admission gate, so a tenant's limits and the
router's (RouterConfig.admission) count both. With a fairness
section in the tenants file, the backend admits through fair admission (router.fair_backend).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from router.admission import Gate
from router.app import build_app
from router.backend import PoolBackend
from router.config import RouterConfig
from router.fair_backend import FairBackend
from router.grpc_api import SERVICE_NAME, GenerateServicer, add_to_server
from router.metrics import RouterMetrics
from router.tenants import Tenants
from router.vtc import VTC
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
        self.admission = Gate.of(config.admission)
        self.metrics = RouterMetrics(self.tenants, self.admission)
        self.backend: PoolBackend | None = None
        self.grpc: ServiceApp | None = None
        self.grpc_address: str | None = None
        self.iccache = None
        self._replay: asyncio.Task | None = None

    async def start(self) -> None:
        cfg = self.config
        self.backend = PoolBackend(cfg, self.metrics)
        fair = self.tenants.fairness if self.tenants is not None else None
        if fair is not None:
            # Counters in the cluster's Redis: every router replica admits by the same standing.
            assert cfg.cluster.redis_url is not None  # RouterConfig checks it
            vtc = VTC(cfg.cluster.redis_url, cfg.cluster.namespace, fair)
            self.backend = FairBackend(self.backend, vtc)  # type: ignore[assignment]
        defaults = {m.name: m.defaults for m in cfg.models}
        if cfg.iccache is not None:  # IC-Cache routes: examples in the cluster's Redis
            from router.iccache.cache import ICCache

            assert cfg.cluster.redis_url is not None
            self.iccache = ICCache.for_router(
                cfg.iccache, cfg.cluster.redis_url, cfg.cluster.namespace, self.tokenizers
            )
            if cfg.iccache.replay_interval_s > 0:
                from router.iccache.replay import Replayer

                replayer = Replayer(self.iccache, self.backend, self.tokenizers)
                self._replay = asyncio.create_task(replayer.run(cfg.iccache.replay_interval_s))
        self.asgi = build_app(
            self.backend,
            self.tokenizers,
            self.tenants,
            cfg.max_body_bytes,
            self.metrics,
            defaults=defaults,
            iccache=self.iccache,
            admission=self.admission,
        )
        if cfg.grpc_port is None:
            return
        try:
            # grpc sets SO_REUSEPORT: several router replicas on a host share the port.
            self.grpc = ServiceApp(cfg.grpc_host, cfg.grpc_port)
        except OSError as e:
            log.warning("gRPC Generate service not started: %s", e)
            return
        servicer = GenerateServicer(
            self.backend, self.tokenizers, self.tenants, defaults, self.admission, self.iccache
        )
        add_to_server(servicer, self.grpc.server)
        self.grpc.add(SERVICE_NAME)
        await self.grpc.start()
        self.grpc_address = self.grpc.address

    async def stop(self) -> None:
        if self.grpc is not None:
            await self.grpc.stop()
        if self.backend is not None:
            await self.backend.close()
        if self._replay is not None:
            self._replay.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._replay
        if self.iccache is not None:
            await self.iccache.close()
