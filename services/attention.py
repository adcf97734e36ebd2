"""The attention replica: a KV pool of its own (no weights, only the model's KV layout) that
lends blocks to decode replicas and attends over them (services/lender.py has the protocol),
or, in offload mode, holds KV head ranges of model workers' pools and attends for them
(services/offload_server.py).

    splitserve serve attention --model DIR --port 0 --redis URL
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path

from kvstore.lending import Ledger
from kvstore.registry import Registration, register_replica
from rpc.server import ServiceApp
from services.attention_client import layout_key
from services.config import AttentionConfig
from services.engine.block_hash import model_fingerprint
from services.engine.config import ModelConfig
from services.engine.kv_cache import KVCache
from services.engine.kv_holder import KVHolder
from services.engine.kv_transfer import KVLayout, dtype_name
from services.lender import Lender
from services.metrics import ServiceMetrics
from services.offload_server import OffloadHost


class AttentionServer:
    """The replica: its KVHolder, gRPC service, ledger entry and registry entry."""

    def __init__(self, config: AttentionConfig) -> None:
        self.config = config
        ecfg = config.engine
        if ecfg.device == "cpu" and config.cpu_threads:
            import torch

            torch.set_num_threads(config.cpu_threads)
        mcfg = ModelConfig.from_dir(config.model)
        dtype = ecfg.resolve_dtype(mcfg)
        bs = ecfg.block_size
        per_block = KVCache.bytes_per_block(mcfg, bs, dtype)
        num_blocks = ecfg.num_kv_blocks or max(2, ecfg.kv_cache_memory_bytes // per_block)
        self.model_id = ecfg.model_id or model_fingerprint(config.model)
        layout = KVLayout(
            mcfg.num_layers, mcfg.num_kv_heads, mcfg.head_dim, dtype_name(dtype), bs, ecfg.device
        )
        self.layout = layout_key(self.model_id, layout)
        self.replica_id = self.holder_id = config.replica_id or f"attention-{uuid.uuid4().hex[:8]}"
        self.metrics = ServiceMetrics("attention", config.name)
        self.offload: OffloadHost | None = None
        self.lender: Lender | None = None
        if config.offload:
            self.offload = OffloadHost(
                mcfg, dtype, ecfg.device, bs, num_blocks * per_block, self.layout, self.replica_id
            )
        else:
            lend_cap = int(num_blocks * config.lend_fraction)
            self.holder = KVHolder(mcfg, num_blocks, bs, dtype, ecfg.device, lend_cap)
            self.metrics.watch_lending(lent=self.holder.lent_to)
            self.lender = Lender(self.holder, self.holder_id, self.layout)
        self.metrics_address: str | None = None  # host:port of /metrics once started, if asked
        self.registration: Registration | None = None
        self.app: ServiceApp

    @property
    def address(self) -> str:
        return self.app.address

    async def start(self) -> str:
        self.app = ServiceApp(self.config.host, self.config.port)
        cfg = self.config
        if self.offload is not None:
            self.offload.add_to(self.app)
            await self.app.start()
            if cfg.metrics_port is not None:
                self.metrics_address = self.metrics.serve(cfg.host, cfg.metrics_port)
            if cfg.cluster.redis_url:
                self.registration = register_replica(
                    cfg.cluster, "attention-offload", self.replica_id, model=cfg.name,
                    address=self.address, load=self._offload_load,
                    metrics_address=self.metrics_address or "",
                )  # fmt: skip
            return self.address
        assert self.lender is not None
        self.lender.add_to(self.app)
        await self.app.start()
        if cfg.metrics_port is not None:
            self.metrics_address = self.metrics.serve(cfg.host, cfg.metrics_port)
        if cfg.cluster.redis_url:
            await self.lender.start_ledger(cfg.cluster, self.address)
            self.registration = register_replica(
                cfg.cluster, "attention", self.replica_id, model=cfg.name, address=self.address,
                load=self._load, holder_id=self.holder_id,
                metrics_address=self.metrics_address or "",
            )  # fmt: skip
        return self.address

    async def stop(self, drain_s: float = 5.0) -> None:
        await self.app.drain(drain_s)
        if self.lender is not None:
            await self.lender.stop_ledger()
        if self.registration is not None:
            self.registration.close()
        await self.app.stop()
        await self.metrics.aclose()

    def _offload_load(self) -> dict[str, int]:
        h = self.offload
        assert h is not None
        return {"running": len(h.sessions), "waiting": 0,
                "free_blocks": (h.budget_bytes - h.used_bytes) >> 10,
                "total_blocks": h.budget_bytes >> 10}  # fmt: skip

    def _load(self) -> dict[str, int]:
        h = self.holder
        free = h.capacity - h.lent
        return {"running": self.lender.num_sessions, "waiting": 0, "free_blocks": free,
                "total_blocks": h.capacity}  # fmt: skip

    # What tests and benchmarks read (the lender's counters).
    @property
    def layer_batches(self) -> int:
        return (self.offload or self.lender).layer_batches

    @property
    def layer_seconds(self) -> float:
        return (self.offload or self.lender).layer_seconds

    @property
    def ledger(self) -> Ledger | None:
        return self.lender.ledger if self.lender is not None else None


def spawn(
    model: Path, redis_url: str, namespace: str, num_kv_blocks: int, *, block_size: int = 16,
    device: str = "cpu", dtype: str = "auto", cpu_threads: int = 0, offload: bool = False,
    name: str | None = None,
) -> subprocess.Popen:  # fmt: skip
    """A replica in a process of its own (`python -m services.attention`), returned once it
    serves, its address in `.address`. Raises RuntimeError if it exits instead."""
    cmd = [
        sys.executable, "-m", "services.attention", "--model", str(model), "--redis", redis_url,
        "--namespace", namespace, "--num-kv-blocks", str(num_kv_blocks), "--block-size",
        str(block_size), "--device", device, "--dtype", dtype, "--cpu-threads", str(cpu_threads),
        *(["--offload"] if offload else []), *(["--name", name] if name else []),
    ]  # fmt: skip
    root = str(Path(__file__).resolve().parents[1])  # where `services` imports from
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": path}
    )
    address = proc.stdout.readline().strip()  # printed once serving
    if not address:
        raise RuntimeError(f"the attention replica exited ({proc.wait()})")
    proc.address = address
    return proc


def main(argv: list[str] | None = None) -> None:
    """`python -m services.attention`: one replica in the foreground (what `splitserve serve
    attention` runs); prints its address once serving, stops on SIGTERM."""
    import argparse

    from kvstore.config import Membership
    from rpc.server import run_until_signal
    from services.engine.config import EngineConfig

    ap = argparse.ArgumentParser(prog="python -m services.attention")
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--redis", required=True, help="Redis URL of the lending ledger")
    ap.add_argument("--namespace", default="splitserve")
    ap.add_argument("--num-kv-blocks", type=int, required=True)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--lend-fraction", type=float, default=1.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--cpu-threads", type=int, default=0)
    ap.add_argument("--offload", action="store_true", help="hold model workers' KV heads")
    ap.add_argument("--name", help="the served model name (default: the model directory's)")
    a = ap.parse_args(argv)
    config = AttentionConfig(
        name=a.name or a.model.name, offload=a.offload, model=a.model, host=a.host, port=a.port,
        cpu_threads=a.cpu_threads,
        cluster=Membership(redis_url=a.redis, namespace=a.namespace),
        lend_fraction=a.lend_fraction,
        engine=EngineConfig(num_kv_blocks=a.num_kv_blocks, block_size=a.block_size,
                            device=a.device, dtype=a.dtype),
    )  # fmt: skip
    server = AttentionServer(config)
    asyncio.run(run_until_signal(server.start, server.stop, lambda a: print(a, flush=True)))


if __name__ == "__main__":
    main()
