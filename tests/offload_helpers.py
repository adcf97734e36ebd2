"""What the attention-offload tests share: attention workers in offload mode (in this process
or their own), a model worker engine attached to them, and the colocated reference."""

from __future__ import annotations

import pytest

from kvstore.registry import list_replicas
from services.attention import AttentionServer, spawn
from services.attention_client import layout_key
from services.config import AttentionConfig
from services.engine.config import EngineConfig
from services.offload_client import AttentionWorkers
from tests.engine_helpers import make_engine

BS = 16


@pytest.fixture
def offload_workers(loop_thread, cluster, tiny_model_dir):
    """start(num_blocks, model_dir=tiny, name="tiny") -> a running attention worker in offload
    mode, its memory worth num_blocks whole blocks; all stopped after."""
    started: list[AttentionServer] = []

    def start(num_blocks: int = 64, model_dir=None, name: str = "tiny") -> AttentionServer:
        cfg = AttentionConfig(
            name=name, model=model_dir or tiny_model_dir, cluster=cluster, offload=True,
            engine=EngineConfig(num_kv_blocks=num_blocks, block_size=BS),
        )  # fmt: skip
        s = AttentionServer(cfg)
        loop_thread.run(s.start())
        started.append(s)
        return s

    yield start
    for s in started:
        if not getattr(s, "killed", False):
            loop_thread.run(s.stop(drain_s=0.5))


def model_worker(
    model_dir, cluster, name: str = "tiny", num_workers: int = 1, num_kv_blocks: int = 32,
    shared: bool = True, local: bool = True, wait_s: float = 10.0, worker_id: str = "model-0",
    **cfg,
):  # fmt: skip
    """An offload engine (no KV of its own) attached to `num_workers` attention workers of
    `name` found in the registry; returns (engine, its AttentionWorkers)."""
    e = make_engine(model_dir, num_kv_blocks=num_kv_blocks, block_size=BS, kv_offload=True, **cfg)
    mc = e.model_config
    workers = AttentionWorkers(
        worker_id, mc, layout_key(e.model_id, e.kv_block_layout()), num_kv_blocks, e.dtype,
        e.device,
        lambda: [r.address for r in list_replicas(
            cluster.redis_url, "attention-offload", name, cluster.namespace)],
        num_workers, e.config.max_num_batched_tokens, shared=shared, local=local, timeout_s=30,
    )  # fmt: skip
    workers.connect(wait_s)
    e.attach_shards(workers)
    return e, workers


def worker_process(model_dir, cluster, num_blocks: int, device: str = "cpu", name: str = "tiny"):
    """An attention worker in offload mode in its own process (one torch thread on a CPU)."""
    return spawn(
        model_dir, cluster.redis_url, cluster.namespace, num_blocks, block_size=BS,
        device=device, dtype="float32" if device != "cpu" else "auto", cpu_threads=1,
        offload=True, name=name,
    )  # fmt: skip
