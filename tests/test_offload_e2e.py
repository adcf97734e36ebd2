"""`splitserve up --mode offload` as a user runs it: SmolLM2 over two model workers (no KV)
and two attention workers holding their KV heads, through the official openai client, with
the tokens of the colocated engine; where the heads live is in Redis, and the model workers'
/metrics count the round trips and bytes."""

from __future__ import annotations

import urllib.request

import grpc
import pytest

from kvstore.registry import list_replicas
from protos.splitserve.v1 import offload_pb2 as pb
from protos.splitserve.v1 import offload_pb2_grpc as pb_grpc
from services.offload_client import placements
from tests.router_helpers import free_port
from tests.up_helpers import start_up, stop_up

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def system(smollm2_dir):
    up = start_up([
        "--mode", "offload", "--model-workers", "2", "--attention-workers", "2",
        "--port", str(free_port()), "--grpc-port", str(free_port()),
    ])  # fmt: skip
    yield up
    stop_up(up["proc"])


def test_offload_serves_token_exact_through_the_openai_client(system, smollm2_dir):
    from openai import OpenAI

    from services.engine.config import EngineConfig
    from services.engine.engine import LLMEngine
    from services.engine.sampling_params import SamplingParams

    local = LLMEngine(smollm2_dir, EngineConfig(num_kv_blocks=256))
    client = OpenAI(base_url=system["url"] + "/v1", api_key="auth-off", max_retries=0)
    prompts = ["The capital of France is", "Write a haiku about the sea:",
               "List three prime numbers:", "def fibonacci(n):"]  # fmt: skip
    for prompt in prompts:
        want = local.generate(
            [local.encode(prompt)], SamplingParams(max_tokens=16, temperature=0.0)
        )[0].text
        got = client.completions.create(
            model="smollm2-135m-instruct", prompt=prompt, max_tokens=16, temperature=0.0,
            timeout=600,
        )  # fmt: skip
        assert got.choices[0].text == want

    redis = system["redis"]
    workers = list_replicas(redis, "attention-offload")
    assert len(workers) == 2
    # Each model worker's two head ranges live on the two attention workers.
    placed = placements(redis, "splitserve")
    assert len(placed) == 2
    addresses = {w.address for w in workers}
    for heads in placed.values():
        assert sorted(heads) == ["0-2", "2-3"] and set(heads.values()) == addresses
    batches = 0
    for w in workers:
        with grpc.insecure_channel(w.address) as ch:
            st = pb_grpc.AttentionOffloadStub(ch).Stats(pb.OffloadStatsRequest(), timeout=30)
        assert st.model_workers == 2
        batches += st.layer_batches
    assert batches > 0
    # The model workers' metrics: round trips and bytes went somewhere.
    sent = 0.0
    for r in list_replicas(redis, "colocated"):
        metrics = _metrics_address(redis, r.replica_id)
        with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=30) as resp:
            text = resp.read().decode()
        for line in text.splitlines():
            if line.startswith("splitserve:offload_bytes_total{") and 'direction="sent"' in line:
                sent += float(line.rsplit(" ", 1)[1])
        assert "splitserve:offload_round_trips_total" in text
    assert sent > 0


def _metrics_address(redis_url: str, replica_id: str) -> str:
    import redis

    r = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        return r.hget(f"splitserve:svc:colocated:{replica_id}", "metrics_address")
    finally:
        r.close()


def test_offload_with_a_prefill_pool_hands_kv_to_the_attention_workers(tmp_path, smollm2_dir):
    """`mode: offload` with a prefill section: a prefill replica computes the prompt, the model
    worker (a decode replica with no KV) pulls its KV and writes each attention worker its heads,
    then decodes; the tokens are the colocated engine's."""
    import yaml
    from openai import OpenAI

    from services.engine.config import EngineConfig
    from services.engine.engine import LLMEngine
    from services.engine.sampling_params import SamplingParams

    cfg = {
        "auth": {"enabled": False},
        "http": {"host": "127.0.0.1", "port": free_port()},
        "grpc": {"host": "127.0.0.1", "port": free_port()},
        "models": [{
            "name": "smol", "path": "smollm2-135m-instruct", "dtype": "float32",
            "mode": "offload", "prefill": {"replicas": 1}, "decode": {"replicas": 1},
            "attention": {"replicas": 2, "kv_memory": "256MiB"},
        }],
    }  # fmt: skip
    path = tmp_path / "app.yaml"
    path.write_text(yaml.safe_dump(cfg))
    up = start_up(["--config", str(path)])
    try:
        local = LLMEngine(smollm2_dir, EngineConfig(num_kv_blocks=256))
        client = OpenAI(base_url=up["url"] + "/v1", api_key="auth-off", max_retries=0)
        for prompt in ("The capital of France is", "Count to five: one, two,"):
            params = SamplingParams(max_tokens=12, temperature=0.0)
            want = local.generate([local.encode(prompt)], params)[0].text
            got = client.completions.create(
                model="smol", prompt=prompt, max_tokens=12, temperature=0.0, timeout=600
            )
            assert got.choices[0].text == want
        redis = up["redis"]
        assert len(list_replicas(redis, "prefill")) == len(list_replicas(redis, "decode")) == 1
        assert len(placements(redis, "splitserve")) == 1  # the model worker's heads
    finally:
        stop_up(up["proc"])
