"""Tenants at the router: API keys, per-tenant concurrency and queue limits over HTTP and gRPC
(counted together), backend refusals, FIFO admission, and the tenants file."""

from __future__ import annotations

import asyncio
import contextlib
import json

import grpc
import httpx2
import openai
import pytest

from protos.splitserve.v1 import generate_pb2 as gpb
from protos.splitserve.v1 import generate_pb2_grpc as gpb_grpc
from router.tenants import Tenant, TenantBusyError, Tenants, TenantsConfigError, hash_key
from tests.kv_helpers import wait_for
from tests.router_helpers import KEY, TIGHT_KEY, assert_error_shape, router_stack


@pytest.fixture(scope="module")
def stack(tiny_model_dir):
    with router_stack(tiny_model_dir) as s:
        yield s


def generate(stack, key: str | None, prompt: str = "hi", max_tokens: int = 2) -> list:
    """A gRPC Generate call to the end; returns its messages (raises AioRpcError's sync twin)."""
    md = [("authorization", f"Bearer {key}")] if key else []
    with grpc.insecure_channel(stack.grpc) as ch:
        stub = gpb_grpc.GenerateStub(ch)
        req = gpb.GenerateRequest(model="tiny", prompt=prompt)
        req.sampling.max_tokens = max_tokens
        return list(stub.Generate(req, metadata=md, timeout=30))


def test_auth(stack):
    url = stack.url
    for key in ("sk-wrong", KEY + "x", KEY[:-1]):
        bad = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
        with pytest.raises(openai.AuthenticationError) as ei:
            bad.completions.create(model="tiny", prompt="hi", max_tokens=2)
        assert ei.value.status_code == 401
        assert ei.value.body["code"] == "invalid_api_key"
    for headers in ({}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"},
                    {"Authorization": "Bearer"}):  # fmt: skip
        r = httpx2.post(f"{url}/v1/completions", headers=headers, json={"model": "tiny"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert_error_shape(r)
    assert httpx2.get(f"{url}/v1/models").status_code == 401
    n = len(stack.backend.calls)
    r = stack.client.completions.create(model="tiny", prompt="hi", max_tokens=2)
    assert r.choices[0].finish_reason in ("length", "stop")
    assert [t for _, _, t in stack.backend.calls[n:]] == ["main"]  # the backend knows who


@contextlib.contextmanager
def tight_slot_taken(stack):
    """The tight tenant's one request slot held by a long streamed completion over HTTP."""
    body = {"model": "tiny", "prompt": "Long story", "max_tokens": 1500, "stream": True,
            "ignore_eos": True}  # fmt: skip
    headers = {"Authorization": f"Bearer {TIGHT_KEY}"}
    url = f"{stack.url}/v1/completions"
    with httpx2.Client(timeout=30) as h, h.stream("POST", url, json=body, headers=headers) as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # kept: dropping the iterator closes the connection
        next(lines)  # the one request the tenant may run is running
        yield


def test_tenant_over_its_limit_gets_429_with_retry_after(stack):
    tight = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=TIGHT_KEY, max_retries=0)
    with tight_slot_taken(stack):
        with pytest.raises(openai.RateLimitError) as ei:
            tight.completions.create(model="tiny", prompt="hi", max_tokens=2)
        assert ei.value.response.headers["retry-after"] == "1"
        assert ei.value.body["code"] == "rate_limit_exceeded"
        # Other tenants are not held back.
        assert stack.client.completions.create(model="tiny", prompt="hi", max_tokens=2)
    # Leaving the stream frees the slot.
    wait_for(lambda: _ok(tight), timeout=30)


def _ok(client) -> bool:
    try:
        client.completions.create(model="tiny", prompt="hi", max_tokens=2)
        return True
    except openai.RateLimitError:
        return False


def test_backend_refusals_become_429_and_503(stack):
    c = stack.client
    with pytest.raises(openai.RateLimitError) as ei:  # RESOURCE_EXHAUSTED: queue full
        c.completions.create(model="busy", prompt="hi", max_tokens=2)
    assert ei.value.response.headers["retry-after"] == "1"
    for stream in (False, True):  # UNAVAILABLE, before a streamed response starts too
        with pytest.raises(openai.InternalServerError) as ei:
            c.completions.create(model="down", prompt="hi", max_tokens=2, stream=stream)
        assert ei.value.status_code == 503


def test_tenant_admission_is_fifo_and_every_slot_comes_back():
    async def go():
        t = Tenant("a", max_concurrent=1, max_queued=2)
        await t.acquire()
        got = []

        async def wait(name):
            await t.acquire()
            got.append(name)

        w1, w2 = asyncio.create_task(wait("w1")), asyncio.create_task(wait("w2"))
        await asyncio.sleep(0)
        assert (t.running, t.queued) == (1, 2)
        with pytest.raises(TenantBusyError):  # 1 running + 2 queued is the limit
            await t.acquire()
        w1.cancel()  # a client that leaves while queued gives its place up
        await asyncio.sleep(0)
        assert t.queued == 1
        t.release()  # the slot goes straight to the next in line
        await w2
        assert got == ["w2"] and (t.running, t.queued) == (1, 0)
        w3 = asyncio.create_task(wait("w3"))
        await asyncio.sleep(0)
        t.release()  # handed to w3 ...
        w3.cancel()  # ... which is cancelled before it runs: it must pass the slot on
        await asyncio.gather(w3, return_exceptions=True)
        assert (t.running, t.queued) == (0, 0)

    asyncio.run(go())


def tenant_of(tenants: Tenants, key: str | None) -> str | None:
    t = tenants.lookup(key)
    return t.name if t is not None else None


def test_tenants_config(tmp_path, monkeypatch):
    doc = f"""
tenants:
  - name: team-a
    keys: [{hash_key("a1")}, {hash_key("a2").upper()}]
    max_concurrent: 2
  - name: team-b
    keys: [{hash_key("b1")}]
"""
    f = tmp_path / "tenants.yaml"
    f.write_text(doc)
    t = Tenants.load(f)
    assert [tenant_of(t, k) for k in ("a1", "a2", "b1", "b2", "", None)] == [
        "team-a", "team-a", "team-b", None, None, None
    ]  # fmt: skip
    assert (t.tenant("team-a").max_concurrent, t.tenant("team-b").max_queued) == (2, 128)
    monkeypatch.setenv("SPLITSERVE_TENANTS", json.dumps(
        {"tenants": [{"name": "j", "keys": [hash_key("j1")]}]}))  # fmt: skip
    assert tenant_of(Tenants.load(), "j1") == "j"
    monkeypatch.setenv("SPLITSERVE_TENANTS", str(f))
    assert tenant_of(Tenants.load(), "b1") == "team-b"
    monkeypatch.delenv("SPLITSERVE_TENANTS")
    monkeypatch.setenv("SPLITSERVE_API_KEY", "plain")
    assert tenant_of(Tenants.load(), "plain") == "default"
    monkeypatch.delenv("SPLITSERVE_API_KEY")
    with pytest.raises(TenantsConfigError, match="no tenants are configured"):
        Tenants.load()
    bad = {
        "tenants.0.keys: keys are SHA-256": [{"name": "x", "keys": ["sk-plain"]}],
        "listed twice": [{"name": "x", "keys": [hash_key("1")]},
                         {"name": "x", "keys": [hash_key("2")]}],
        "a key digest is listed twice": [{"name": "x", "keys": [hash_key("1")]},
                                         {"name": "y", "keys": [hash_key("1")]}],
        "tenants.0.max_concurrent": [{"name": "x", "keys": [hash_key("1")],
                                      "max_concurrent": 0}],
        "tenants: List should have at least 1 item": [],
    }  # fmt: skip
    for match, tenants in bad.items():
        with pytest.raises(TenantsConfigError, match=match):
            Tenants.from_dict({"tenants": tenants})
    with pytest.raises(TenantsConfigError, match="cannot read"):
        Tenants.load(tmp_path / "missing.yaml")


def test_grpc_generate_shares_the_tenants_limits(stack):
    with pytest.raises(grpc.RpcError) as ei:
        generate(stack, None)
    assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
    msgs = generate(stack, TIGHT_KEY)
    assert msgs[-1].finish_reason in ("length", "stop")
    with tight_slot_taken(stack):  # the tight tenant's one slot is taken over HTTP ...
        with pytest.raises(grpc.RpcError) as ei:  # ... so its gRPC call is refused
            generate(stack, TIGHT_KEY)
        assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "tight" in ei.value.details()
        assert generate(stack, KEY)[-1].finish_reason  # other tenants go on
    wait_for(lambda: _grpc_ok(stack, TIGHT_KEY), timeout=30)  # the slot came back
    assert stack.lt.run(stack.server.loop.call(lambda e: e.check_integrity())).in_use == 0


def _grpc_ok(stack, key) -> bool:
    try:
        generate(stack, key)
        return True
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
            raise
        return False


def test_priority_out_of_range_is_refused(stack):
    h = {"Authorization": f"Bearer {KEY}"}
    for bad in (8, 256, -1):
        r = httpx2.post(
            f"{stack.url}/v1/completions", headers=h,
            json={"model": "tiny", "prompt": "hi", "max_tokens": 2, "priority": bad},
        )  # fmt: skip
        assert r.status_code == 400, (bad, r.text)
        assert assert_error_shape(r)["param"] == "priority"
    r = httpx2.post(
        f"{stack.url}/v1/completions", headers=h,
        json={"model": "tiny", "prompt": "hi", "max_tokens": 2, "priority": 7},
    )  # fmt: skip
    assert r.status_code == 200, r.text
    with grpc.insecure_channel(stack.grpc) as ch:
        stub = gpb_grpc.GenerateStub(ch)
        req = gpb.GenerateRequest(model="tiny", prompt="hi", priority=8)
        req.sampling.max_tokens = 2
        with pytest.raises(grpc.RpcError) as ei:
            list(stub.Generate(req, metadata=[("authorization", f"Bearer {KEY}")], timeout=30))
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "priority must be within [0, 8)" in ei.value.details()
        req.priority = 3
        assert list(stub.Generate(req, metadata=[("authorization", f"Bearer {KEY}")], timeout=30))
    # The decode service checks what reaches it too.
    from protos.splitserve.v1 import decode_pb2, decode_pb2_grpc

    with grpc.insecure_channel(stack.server.address) as ch:
        dreq = decode_pb2.DecodeRequest(model="tiny", prompt_token_ids=[1, 2], priority=300)
        dreq.sampling.max_tokens = 2
        with pytest.raises(grpc.RpcError) as ei:
            list(decode_pb2_grpc.DecodeStub(ch).Decode(dreq, timeout=30))
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "priority must be within [0, 255]" in ei.value.details()
