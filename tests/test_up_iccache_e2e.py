"""IC-Cache as a user meets it: `splitserve up --config` with two models and an iccache
section (Ray Serve, the router, a colocated replica per model, the embedding replica with the
real all-MiniLM-L6-v2, a private valkey), driven by the official openai client.

The two models are the tiny presets (tiny as the small one, tiny-qwen2 as the large one): the
wiring is what is under test, and real models would spend the suite's time loading weights
(bench/iccache.py runs the real pair). The bandit's priors are set so its choices are known
(no exploration): the large model while no example is at hand, small+examples once one is.
"""

from __future__ import annotations

import pytest
import yaml

from kvstore.registry import list_replicas
from router.tenants import hash_key
from tests.router_helpers import free_port
from tests.up_helpers import start_up, stop_up

pytestmark = pytest.mark.slow

KEYS = {"alice": "sk-alice-0123456789", "bob": "sk-bob-0123456789"}
QUESTION = "Who wrote Hamlet?"


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    d = tmp_path_factory.mktemp("iccache-up")
    tenants = d / "tenants.yaml"
    tenants.write_text(yaml.safe_dump({"tenants": [
        {"name": t, "keys": [hash_key(k)], "max_concurrent": 4} for t, k in KEYS.items()
    ]}))  # fmt: skip
    port, gport = free_port(), free_port()
    model = {"dtype": "float32", "mode": "colocated", "engine": {"num_kv_blocks": 256}}
    cfg = {
        "http": {"host": "127.0.0.1", "port": port},
        "grpc": {"host": "127.0.0.1", "port": gport},
        "auth": {"enabled": True, "tenants_file": str(tenants)},
        "metrics": {"port": 0},
        "models": [{"name": "small", "path": "tiny", **model},
                   {"name": "large", "path": "tiny-qwen2", **model}],
        "iccache": {
            "routes": [{"name": "auto", "small": "small", "large": "large",
                        "tenants": ["alice"]}],
            "embed": {"model": "all-minilm-l6-v2", "threads": 1},
            "capacity": "1MiB",
            "alpha": 0.0,
            "arm_priors": [0.9, 0.1, 0.5],
            "replay_interval_s": 0.5,  # the router's replay loop runs beside the requests
        },
    }  # fmt: skip
    path = d / "app.yaml"
    path.write_text(yaml.safe_dump(cfg))
    up = start_up(["--config", str(path)])
    assert up["redis"], "".join(up["stderr"])
    yield {"url": up["url"], "redis": up["redis"], "grpc": f"127.0.0.1:{gport}"}
    stop_up(up["proc"])


def client(system, tenant: str):
    from openai import OpenAI

    return OpenAI(base_url=system["url"] + "/v1", api_key=KEYS[tenant], max_retries=0)


def ask(c, **kw):
    raw = c.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": QUESTION}], temperature=0,
        timeout=120, **kw,
    )  # fmt: skip
    return raw.headers, raw.parse()


def greedy_stop_token() -> int:
    """A token the large model's greedy answer to QUESTION reaches after some text (the tiny
    model repeats itself): as a stop token it makes the answer complete (finish "stop"), which
    is what the manager admits as an example."""
    import os

    from services.engine.config import EngineConfig
    from services.engine.engine import LLMEngine
    from services.engine.sampling_params import SamplingParams
    from services.engine.tokenizer import load_tokenizer

    home = os.environ.get("SPLITSERVE_HOME", os.path.expanduser("~/.cache/splitserve"))
    large_dir = os.path.join(home, "models", "preset-tiny-qwen2")  # made by `up`
    ids = load_tokenizer(large_dir).apply_chat_template([{"role": "user", "content": QUESTION}])
    eng = LLMEngine(large_dir, EngineConfig(num_kv_blocks=64))
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    out = eng.generate([ids], sp)[0].token_ids
    return next(t for k, t in enumerate(out) if k >= 2 and t not in out[:k])


def test_auto_route_answers_with_examples_and_takes_feedback(system):
    import openai

    alice = client(system, "alice")
    assert {m.id for m in alice.models.list().data} == {"small", "large"}
    assert list_replicas(system["redis"], "embed", "all-minilm-l6-v2")  # the embed replica

    # No example yet: the large model answers, completely, and its answer becomes one.
    stop = greedy_stop_token()
    headers, first = ask(alice, max_tokens=12, extra_body={"stop_token_ids": [stop]})
    assert (headers["x-splitserve-model"], headers["x-splitserve-examples"]) == ("large", "0")
    assert first.choices[0].finish_reason == "stop", first
    want = {"route": "auto", "model": "large", "arm": "large", "examples": 0}
    assert first.usage.model_extra["iccache"] == want

    # The same question again: the small model answers with that answer as its example.
    headers, second = ask(alice, max_tokens=8)
    assert (headers["x-splitserve-model"], headers["x-splitserve-examples"]) == ("small", "1")
    want = {"route": "auto", "model": "small", "arm": "small+examples", "examples": 1}
    assert second.usage.model_extra["iccache"] == want
    assert second.model == "small"

    # Feedback through the same client: a score in [0, 1], once per response, its own only.
    fb = alice.post("/feedback", body={"id": second.id, "score": 1.0}, cast_to=object)
    assert fb["arm"] == "small+examples" and fb["reward"] == pytest.approx(0.95)
    with pytest.raises(openai.NotFoundError):
        alice.post("/feedback", body={"id": second.id, "score": 1.0}, cast_to=object)
    with pytest.raises(openai.BadRequestError):
        alice.post("/feedback", body={"id": first.id, "score": 1.5}, cast_to=object)
    bob = client(system, "bob")
    with pytest.raises(openai.NotFoundError):  # not bob's response
        bob.post("/feedback", body={"id": first.id, "score": 0.5}, cast_to=object)
    ok = alice.post("/feedback", body={"id": first.id, "score": 0.5}, cast_to=object)
    assert ok["arm"] == "large"

    # The route is alice's only; bob still has the models themselves.
    with pytest.raises(openai.NotFoundError):
        ask(bob, max_tokens=4)
    direct = bob.chat.completions.create(
        model="small", messages=[{"role": "user", "content": QUESTION}], max_tokens=4
    )
    assert direct.usage.completion_tokens >= 1


def test_grpc_generate_serves_the_route_for_chat_messages(system):
    import grpc

    from protos.splitserve.v1 import common_pb2
    from protos.splitserve.v1 import generate_pb2 as pb
    from protos.splitserve.v1 import generate_pb2_grpc as pb_grpc

    sampling = common_pb2.SamplingParams(max_tokens=4, ignore_eos=True)

    def generate(tenant: str, **input) -> tuple[grpc.StatusCode, str, dict, list]:
        with grpc.insecure_channel(system["grpc"]) as ch:
            call = pb_grpc.GenerateStub(ch).Generate(
                pb.GenerateRequest(model="auto", sampling=sampling, **input),
                metadata=(("authorization", f"Bearer {KEYS[tenant]}"),),
                timeout=120,
            )  # fmt: skip
            try:
                msgs = list(call)
            except grpc.RpcError as e:
                return e.code(), e.details(), {}, []
            return grpc.StatusCode.OK, "", dict(call.initial_metadata()), msgs

    chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=QUESTION)])
    code, why, md, msgs = generate("alice", chat=chat)
    assert code == grpc.StatusCode.OK, why
    assert md["x-splitserve-model"] in ("small", "large")
    assert int(md["x-splitserve-examples"]) >= 0
    assert sum(len(m.token_ids) for m in msgs) == 4 and msgs[-1].usage.completion_tokens == 4
    # Feedback over HTTP takes the id the metadata named, once.
    alice = client(system, "alice")
    got = alice.post("/feedback", body={"id": md["x-splitserve-response-id"], "score": 1.0},
                     cast_to=object)  # fmt: skip
    assert got["arm"] in ("small+examples", "small", "large")

    code, why, _, _ = generate("alice", prompt=QUESTION)  # no messages: nothing to match on
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "chat messages" in why, why
    code, why, _, _ = generate("bob", chat=chat)  # not bob's route: as unknown as any name
    assert code == grpc.StatusCode.NOT_FOUND and "IC-Cache" not in why, why
