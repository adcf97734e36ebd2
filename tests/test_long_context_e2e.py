"""The shipped long-context example as a user runs it: `splitserve up --config
examples/long-context.yaml` answers, through the official openai client, a prompt longer than
its one replica's KV pool, borrowing from the two attention replicas, with the tokens of one
engine holding everything."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import yaml

from kvstore.registry import list_replicas
from protos.splitserve.v1 import attention_pb2 as pb
from protos.splitserve.v1 import attention_pb2_grpc as pb_grpc
from tests.router_helpers import free_port
from tests.up_helpers import start_up, stop_up

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "long-context.yaml"


@pytest.fixture(scope="module")
def system(tmp_path_factory, smollm2_dir):
    cfg = yaml.safe_load(EXAMPLE.read_text())
    port, gport = free_port(), free_port()
    cfg["http"] = {"host": "127.0.0.1", "port": port}
    cfg["grpc"] = {"host": "127.0.0.1", "port": gport}
    path = tmp_path_factory.mktemp("long") / "app.yaml"
    path.write_text(yaml.safe_dump(cfg))
    up = start_up(["--config", str(path)])
    yield {"url": up["url"], "redis": up["redis"], "cfg": cfg}
    stop_up(up["proc"])


def test_prompt_longer_than_the_replica_pool_answers_token_exact(system, smollm2_dir):
    from openai import OpenAI

    from services.engine.config import EngineConfig
    from services.engine.engine import LLMEngine
    from services.engine.sampling_params import SamplingParams

    model = system["cfg"]["models"][0]
    pool_tokens = model["engine"]["num_kv_blocks"] * model["engine"]["block_size"]
    # Varied text (so the answer depends on all of it), over twice the replica's own pool.
    words = [f"item {i}: the {['red', 'blue', 'green'][i % 3]} box holds {i * 7 % 13}" for i in
             range(120)]  # fmt: skip
    prompt = "Here is an inventory. " + "; ".join(words) + ". What does item 5 hold? Answer:"

    local = LLMEngine(smollm2_dir, EngineConfig(num_kv_blocks=512))
    ids = local.encode(prompt)
    assert len(ids) > 2 * pool_tokens
    want = local.generate([ids], SamplingParams(max_tokens=12, temperature=0.0))[0].text

    client = OpenAI(base_url=system["url"] + "/v1", api_key="auth-off", max_retries=0)
    got = client.completions.create(
        model=model["name"], prompt=prompt, max_tokens=12, temperature=0.0, timeout=600
    )
    assert got.usage.prompt_tokens == len(ids)
    assert got.choices[0].text == want

    # Both attention replicas held part of it and attended over it.
    assert system["redis"], "splitserve up did not say where its Redis is"
    replicas = list_replicas(system["redis"], "attention")
    assert len(replicas) == 2
    batches = []
    for r in replicas:
        with grpc.insecure_channel(r.address) as ch:
            st = pb_grpc.AttentionStub(ch).Stats(pb.AttentionStatsRequest(), timeout=30)
        batches.append(st.layer_batches)
    assert sum(batches) > 0
