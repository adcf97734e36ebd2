"""Engine replicas for the service tests: real prefill/decode servers over a tiny model, with
fast heartbeats so registry and index changes show within a test's patience."""

from __future__ import annotations

from pathlib import Path

from kvstore.config import Membership
from services.config import DecodeConfig, PrefillConfig
from services.decode import DecodeServer
from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.prefill import PrefillServer


def cluster(redis_url: str | None, namespace: str = "splitserve") -> Membership:
    return Membership(redis_url=redis_url, namespace=namespace, heartbeat_s=0.25, ttl_s=1.5)


def _engine_config(engine: dict) -> EngineConfig:
    engine.setdefault("num_kv_blocks", 512)
    return EngineConfig(**engine)


def decode_server(
    model_dir: Path,
    redis_url: str | None = None,
    namespace: str = "splitserve",
    engine: dict | None = None,
    **kw,
) -> DecodeServer:
    """A decode replica (colocated=True: a whole-request one) of the model named "tiny";
    engine: EngineConfig fields; kw: DecodeConfig fields."""
    ecfg = _engine_config(dict(engine or {}))
    cfg = DecodeConfig(
        name="tiny", model=model_dir, engine=ecfg, cluster=cluster(redis_url, namespace), **kw
    )
    return DecodeServer(cfg, LLMEngine(model_dir, ecfg, seed=0))


def prefill_server(
    model_dir: Path,
    redis_url: str | None,
    namespace: str = "splitserve",
    engine: dict | None = None,
    **kw,
) -> PrefillServer:
    ecfg = _engine_config(dict(engine or {}))
    cfg = PrefillConfig(
        name="tiny", model=model_dir, engine=ecfg, cluster=cluster(redis_url, namespace), **kw
    )
    return PrefillServer(cfg, LLMEngine(model_dir, ecfg, seed=0))
