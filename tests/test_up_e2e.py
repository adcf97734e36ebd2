"""The whole system as a user meets it: `splitserve up` (Ray Serve, router, prefill and decode
replicas, a real valkey) driven by the official openai client and the gRPC Generate client."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import grpc
import pytest

from bench.up_process import listening_pid, redis_pid
from kvstore.registry import list_replicas
from loadgen.readers import read_trace
from tests.router_helpers import free_port
from tests.up_helpers import start_up, stop_up

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def system():
    """`splitserve up` as a user runs it: no --redis, so it starts its own private server."""
    port, gport = free_port(), free_port()
    up = start_up(["--model", "tiny", "--port", str(port), "--grpc-port", str(gport)])
    assert up["redis"], "".join(up["stderr"])
    assert up["redis"].startswith("redis://127.0.0.1:"), up["redis"]
    proc = up["proc"]
    yield {"url": up["url"], "grpc": f"127.0.0.1:{gport}", "redis": up["redis"], "proc": proc}
    stop_up(proc)


def _client(system):
    from openai import OpenAI

    return OpenAI(base_url=system["url"] + "/v1", api_key="unused-auth-off", max_retries=0)


def test_chat_and_completions_streaming_and_not(system):
    c = _client(system)
    models = [m.id for m in c.models.list().data]
    assert models == ["tiny"]
    chat = c.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hello there"}], max_tokens=12,
        temperature=0, extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert chat.choices[0].finish_reason == "length"
    assert chat.usage.completion_tokens == 12 and chat.usage.prompt_tokens > 0
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + 12
    stream = c.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hello there"}], max_tokens=12,
        temperature=0, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    text, usage = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        usage = chunk.usage or usage
    assert text == chat.choices[0].message.content and usage.completion_tokens == 12


def test_greedy_equals_splitserve_generate(system, tmp_path):
    c = _client(system)
    prompt = "Once upon a time"
    out = c.completions.create(
        model="tiny", prompt=prompt, max_tokens=16, temperature=0, extra_body={"ignore_eos": True}
    )
    home = os.environ.get("SPLITSERVE_HOME", os.path.expanduser("~/.cache/splitserve"))
    model_dir = os.path.join(home, "models", "preset-tiny")
    gen = subprocess.run(
        [sys.executable, "-m", "splitserve.cli", "generate", "--model", model_dir, "--prompt",
         prompt, "--max-tokens", "16", "--temperature", "0", "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert gen.returncode == 0, gen.stderr
    ref = json.loads(gen.stdout.strip().splitlines()[-1])
    # `generate` stops at EOS; compare the shared length.
    n = len(ref["token_ids"])
    assert out.usage.completion_tokens >= n
    assert out.choices[0].text.startswith(ref["text"])


def test_grpc_generate_client(system):
    from protos.splitserve.v1 import common_pb2, generate_pb2, generate_pb2_grpc

    with grpc.insecure_channel(system["grpc"]) as ch:
        stub = generate_pb2_grpc.GenerateStub(ch)
        req = generate_pb2.GenerateRequest(
            model="tiny", prompt="Hello", sampling=common_pb2.SamplingParams(
                max_tokens=8, temperature=0, ignore_eos=True))  # fmt: skip
        msgs = list(stub.Generate(req, timeout=60))
    assert sum(len(m.token_ids) for m in msgs) == 8
    assert msgs[-1].finish_reason == "length" and msgs[-1].usage.completion_tokens == 8
    with grpc.insecure_channel(system["grpc"]) as ch, pytest.raises(grpc.RpcError) as e:
        list(generate_pb2_grpc.GenerateStub(ch).Generate(
            generate_pb2.GenerateRequest(model="nope", prompt="x"), timeout=30))  # fmt: skip
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_disconnect_frees_blocks_everywhere(system):
    import httpx

    body = {"model": "tiny", "prompt": "abc", "max_tokens": 1500, "temperature": 0,
            "ignore_eos": True, "stream": True}  # fmt: skip
    with (
        httpx.Client(timeout=60) as h,
        h.stream("POST", system["url"] + "/v1/completions", json=body) as r,
    ):
        for i, _ in enumerate(r.iter_lines()):
            if i > 5:
                break  # hang up mid-stream

    def idle() -> bool:
        reps = [*list_replicas(system["redis"], "decode", "tiny"),
                *list_replicas(system["redis"], "prefill", "tiny")]  # fmt: skip
        return bool(reps) and all(
            r.running == 0 and r.waiting == 0 and r.free_blocks == r.total_blocks for r in reps
        )

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not idle():
        time.sleep(0.25)
    assert idle()


def test_hostile_requests_get_4xx_and_server_stays_healthy(system):
    import httpx

    bad = [b"{", b"[]", b'{"model": 5}', b'{"model": "tiny", "prompt": "x", "max_tokens": -1}',
           b'{"model": "tiny", "messages": []}', b'{"model": "nope", "prompt": "x"}',
           b'{"model": "tiny", "prompt": "x", "temperature": "hot"}',
           b'{"model": "tiny", "prompt": "x", "max_tokens": 99999999}', b"\xff\xfe"]  # fmt: skip
    with httpx.Client(timeout=30) as h:
        for i in range(200):
            path = "/v1/chat/completions" if i % 2 else "/v1/completions"
            r = h.post(system["url"] + path, content=bad[i % len(bad)],
                       headers={"content-type": "application/json"})  # fmt: skip
            assert 400 <= r.status_code < 500, (r.status_code, r.text)
            assert set(r.json()["error"]) >= {"message", "type", "param", "code"}
        assert h.get(system["url"] + "/health").status_code == 200


def test_metrics_endpoint_parses_and_moves(system):
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    def total() -> float:
        text = httpx.get(system["url"] + "/metrics", timeout=10).text
        fams = {f.name: f for f in text_string_to_metric_families(text)}
        fam = fams.get("splitserve:router_requests")
        return sum(s.value for s in fam.samples if s.name.endswith("_total")) if fam else 0.0

    before = total()
    _client(system).completions.create(model="tiny", prompt="x", max_tokens=2)
    assert total() >= before + 1


def test_splitserve_bench_replays_a_trace_against_the_system(system, tmp_path):
    home = os.environ.get("SPLITSERVE_HOME", os.path.expanduser("~/.cache/splitserve"))
    tokenizer = os.path.join(home, "models", "preset-tiny")
    # BurstGPT's schema (no real file ships): two tenants by model label.
    burst = tmp_path / "burstgpt.csv"
    burst.write_text(
        "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
        "0,ChatGPT,40,8,48,Conversation log\n1,GPT-4,90,8,98,API log\n"
        "1,ChatGPT,20,8,28,Conversation log\n2,GPT-4,60,8,68,Conversation log\n"
    )
    runs = [  # (url, trace options, requests): every trace format, over HTTP and gRPC
        (system["url"] + "/v1", ["--trace", "azure-conv"], 8),
        ("grpc://" + system["grpc"], ["--trace", "azure-conv"], 8),
        (system["url"] + "/v1", ["--trace", "mooncake-conversation", "--length-scale", "0.02"], 6),
        (system["url"] + "/v1", ["--trace", str(burst), "--tenant", "ChatGPT=k1",
                                 "--tenant", "GPT-4=k2", "--tenant-by", "model"], 4),
    ]  # fmt: skip
    for i, (url, trace, n) in enumerate(runs):
        out = tmp_path / f"run{i}"
        r = subprocess.run(
            [sys.executable, "-m", "splitserve.cli", "bench", "run", "--url", url, "--model",
             "tiny", "--tokenizer", tokenizer, *trace, "--requests", str(n),
             "--speedup", "50", "--max-prompt-tokens", "256", "--max-output-tokens", "8",
             "--quiet", "--no-plots", "--out", str(out)],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr[-2000:]
        report = json.loads((out / "report.json").read_text())
        summary = report["summary"]
        assert summary["completed"] == n and summary["failed"] == 0, (trace, summary)
        # Outputs capped at 8 tokens (EOS ignored); Mooncake's lengths are scaled by 0.02 first.
        outs = [r.output_tokens for r in read_trace(trace[1]).requests[:n]]
        scale = 0.02 if "--length-scale" in trace else 1.0
        assert summary["output_tokens"] == sum(min(8, max(1, round(o * scale))) for o in outs)
        assert summary["prompt_token_mismatches"] == 0  # prompts were exactly the trace lengths
        # <=: on a loaded machine all of a short answer can arrive in one chunk.
        assert 0 < summary["ttft_s"]["p50"] <= summary["e2e_s"]["p50"]
    assert set(report["tenants"]) == {"ChatGPT", "GPT-4"}


def _redis_pid(system) -> int:
    """The private Redis server `up` runs, among its processes, by its port."""
    return redis_pid(system["proc"].pid, system["redis"])


def test_killed_embedded_redis_is_restarted_and_health_tells_the_truth(system):
    """SIGKILL up's private Redis server: up starts it again on its port, no completion or
    health check gets a 5xx other than a clear 503 meanwhile, and the system is healthy and
    serving again with a fresh Redis (replicas re-registered) within seconds."""
    import signal

    import httpx

    old = _redis_pid(system)
    os.kill(old, signal.SIGKILL)
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 2}
    seen, deadline = [], time.monotonic() + 60
    with httpx.Client(timeout=30) as h:
        while True:
            assert time.monotonic() < deadline, f"not recovered in 60 s: {seen[-5:]}"
            health = h.get(system["url"] + "/health")
            r = h.post(system["url"] + "/v1/completions", json=body)
            seen.append((health.status_code, health.json()["status"], r.status_code))
            assert health.status_code in (200, 503), health.text
            assert r.status_code in (200, 503), r.text
            if r.status_code == 503:
                assert r.headers["retry-after"] == "1" and r.json()["error"]["message"]
            try:
                new = _redis_pid(system)
            except LookupError:
                new = None
            # Recovered: a new server holding the replicas' registrations again, and serving.
            if new not in (None, old) and seen[-1] == (200, "ok", 200):
                roles = [list_replicas(system["redis"], role, "tiny")
                         for role in ("prefill", "decode")]  # fmt: skip
                if all(roles):
                    break
            time.sleep(0.2)


def _resumed(system) -> float:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(system["url"] + "/metrics", timeout=30).text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    fam = fams.get("splitserve:requests_resumed")
    return sum(s.value for s in fam.samples if s.name.endswith("_total")) if fam else 0.0


def test_engine_replicas_run_at_normal_priority(system):
    """Ray would lower its workers to nice 15, where any daemon on the host preempts the
    engine's threads; `up` runs them at the priority it was started with."""
    import os

    for role in ("prefill", "decode"):
        [replica] = list_replicas(system["redis"], role, "tiny")
        pid = listening_pid(int(replica.address.rsplit(":", 1)[1]))
        assert os.getpriority(os.PRIO_PROCESS, pid) == os.nice(0), role


def test_killed_decode_replica_mid_stream_the_stream_continues_token_exact(system):
    """SIGKILL the decode replica in the middle of a stream: Ray Serve starts another, the
    router continues the request there from the tokens delivered, and the client's stream is
    the uninterrupted one, token for token (greedy; a presence penalty makes every token depend
    on all those before it)."""
    import signal

    import httpx

    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 1500, "temperature": 0,
            "presence_penalty": 2.0, "ignore_eos": True, "logprobs": 0}  # fmt: skip
    [decode] = list_replicas(system["redis"], "decode", "tiny")
    pid = listening_pid(int(decode.address.rsplit(":", 1)[1]))
    before = _resumed(system)
    tokens, text, finish, killed = [], "", None, False
    with (
        httpx.Client(timeout=120) as h,
        h.stream("POST", system["url"] + "/v1/completions", json={**body, "stream": True}) as r,
    ):
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            for c in chunk["choices"]:
                tokens += c["logprobs"]["tokens"]
                text += c["text"]
                finish = c["finish_reason"] or finish
            if not killed and len(tokens) >= 8:
                os.kill(pid, signal.SIGKILL)
                killed = True
    assert killed and finish == "length" and len(tokens) == 1500
    assert _resumed(system) >= before + 1
    whole = httpx.post(system["url"] + "/v1/completions", json=body, timeout=120).json()
    assert tokens == whole["choices"][0]["logprobs"]["tokens"]
    assert text == whole["choices"][0]["text"]
