"""Tenants cannot see each other's prefix cache: block ids are salted with each tenant's cache
scope, so a prompt one tenant sent never hits for another (in the prefill or decode engine, or
the KV store), while tenants naming the same `cache_scope` share, and one tenant's repeats
still hit. Through the real router (HTTP and gRPC) over real prefill and decode replicas."""

from __future__ import annotations

import random

import grpc
import httpx2
import pytest

from kvstore.config import Membership
from kvstore.registry import list_replicas
from protos.splitserve.v1 import generate_pb2 as gpb
from protos.splitserve.v1 import generate_pb2_grpc as gpb_grpc
from router.app import build_app
from router.backend import PoolBackend
from router.config import ModelRoute, RouterConfig
from router.grpc_api import GenerateServicer
from router.tenants import Tenants, TenantsConfigError, hash_key
from services.engine.block_hash import ROOT_HASH, hash_blocks, root_hash
from services.engine.errors import InvalidRequestError
from services.engine.sampling_params import SamplingParams
from services.engine.tokenizer import load_tokenizer
from tests.kv_helpers import wait_for
from tests.replica_helpers import decode_server, prefill_server
from tests.router_helpers import engine, serve

TENANTS = {  # name -> (API key, cache_scope)
    "alpha": ("sk-alpha-000000000001", None),
    "beta": ("sk-beta-0000000000002", None),
    "gamma": ("sk-gamma-000000000003", "team"),
    "delta": ("sk-delta-000000000004", "team"),
    "team": ("sk-team-0000000000005", None),  # a tenant named like the scope: still private
}


def tenants() -> Tenants:
    specs = []
    for name, (key, scope) in TENANTS.items():
        spec = {"name": name, "keys": [hash_key(key)]}
        if scope is not None:
            spec["cache_scope"] = scope
        specs.append(spec)
    return Tenants.from_dict({"tenants": specs})


# -- block ids and the tenants file ------------------------------------------------------------


def test_salted_block_ids_differ_at_every_block_and_empty_salt_is_unsalted():
    toks = list(range(100, 180))
    plain = hash_blocks(toks, 16, "m")
    assert hash_blocks(toks, 16, "m", cache_salt="") == plain and root_hash("") == ROOT_HASH
    a = hash_blocks(toks, 16, "m", cache_salt="tenant:a")
    b = hash_blocks(toks, 16, "m", cache_salt="tenant:b")
    assert len(a) == len(b) == len(plain) == 5
    assert not set(a) & set(b) and not set(a) & set(plain)
    assert hash_blocks(toks, 16, "m", cache_salt="tenant:a") == a  # deterministic


def test_tenant_salts_private_by_default_shared_by_scope():
    t = tenants()
    salts = {name: t.tenant(name).cache_salt for name in TENANTS}
    assert salts["gamma"] == salts["delta"]
    assert len({salts["alpha"], salts["beta"], salts["gamma"], salts["team"]}) == 4
    with pytest.raises(TenantsConfigError, match="cache_scope"):
        Tenants.from_dict({"tenants": [{"name": "x", "keys": [hash_key("k")], "cache_scope": ""}]})


def test_engine_hits_only_its_own_salt(tiny_model_dir, checked):
    e = checked(engine(tiny_model_dir))
    prompt = random.Random(3).choices(range(5, 500), k=64)
    greedy = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)

    def cached(rid: str, salt: str) -> tuple[int, list[int]]:
        e.add_request(rid, prompt, greedy, cache_salt=salt)
        outs = []
        while e.has_unfinished():
            outs += [o for o in e.step() if o.request_id == rid]
        return outs[-1].num_cached_tokens, [t for o in outs for t in o.new_token_ids]

    first, tokens = cached("a1", "tenant:a")
    assert first == 0
    assert cached("b1", "tenant:b") == (0, tokens)  # same answer, no hit
    assert cached("a2", "tenant:a")[0] > 0
    with pytest.raises(InvalidRequestError, match="cache_salt"):
        e.add_request("long", prompt, greedy, cache_salt="x" * 1000)


# -- the router over real prefill and decode replicas ------------------------------------------


@pytest.fixture
def stack(tiny_model_dir, redis_url, namespace, loop_thread):
    """One prefill and one decode replica, the HTTP app and the gRPC Generate service with the
    tenants above."""
    pre = prefill_server(tiny_model_dir, redis_url, namespace, replica_id="prefill-0")
    dec = decode_server(tiny_model_dir, redis_url, namespace, replica_id="decode-0")
    loop_thread.run(pre.start())
    loop_thread.run(dec.start())
    wait_for(lambda: list_replicas(redis_url, "prefill", "tiny", namespace), 30)
    wait_for(lambda: list_replicas(redis_url, "decode", "tiny", namespace), 30)
    e = pre.engine
    config = RouterConfig(
        models=(
            ModelRoute(name="tiny", model_dir=str(tiny_model_dir), model_id=e.model_id,
                       block_size=e.block_size, max_model_len=e.max_model_len),
        ),
        cluster=Membership(redis_url=redis_url, namespace=namespace),
        refresh_s=0.05,
    )  # fmt: skip
    tok = load_tokenizer(tiny_model_dir)
    ts = tenants()
    # One backend per event loop: uvicorn's thread serves HTTP, loop_thread serves gRPC.
    http_backend, grpc_backend = PoolBackend(config), PoolBackend(config)
    app = build_app(http_backend, {"tiny": tok}, ts)

    async def start_grpc():
        g = grpc.aio.server()
        gpb_grpc.add_GenerateServicer_to_server(
            GenerateServicer(grpc_backend, {"tiny": tok}, ts), g
        )
        port = g.add_insecure_port("127.0.0.1:0")
        await g.start()
        return g, f"127.0.0.1:{port}"

    g, grpc_addr = loop_thread.run(start_grpc())
    try:
        with serve(app) as url:
            yield url, grpc_addr, pre, dec
    finally:
        loop_thread.run(g.stop(None))
        loop_thread.run(grpc_backend.close())
        loop_thread.run(pre.stop(drain_s=1))
        loop_thread.run(dec.stop(drain_s=1))


def complete(url: str, tenant: str, prompt: list[int]) -> tuple[int, list[str]]:
    """(cached prompt tokens, the completion's text) of a greedy completion by `tenant`."""
    r = httpx2.post(
        f"{url}/v1/completions",
        headers={"Authorization": f"Bearer {TENANTS[tenant][0]}"},
        json={"model": "tiny", "prompt": prompt, "max_tokens": 3, "temperature": 0,
              "ignore_eos": True},
        timeout=60,
    )  # fmt: skip
    assert r.status_code == 200, r.text
    body = r.json()
    return body["usage"]["prompt_tokens_details"]["cached_tokens"], body["choices"][0]["text"]


def grpc_cached(addr: str, tenant: str, prompt: list[int]) -> int:
    with grpc.insecure_channel(addr) as ch:
        req = gpb.GenerateRequest(model="tiny")
        req.prompt_token_ids.ids.extend(prompt)
        req.sampling.max_tokens = 3
        md = [("authorization", f"Bearer {TENANTS[tenant][0]}")]
        msgs = list(gpb_grpc.GenerateStub(ch).Generate(req, metadata=md, timeout=60))
    return msgs[-1].usage.cached_tokens


def engine_hits(server, loop_thread, prompt: list[int], tenant: str) -> int:
    """Leading blocks of the prompt, named under the tenant's salt, in a replica's prefix
    cache."""
    e = server.engine
    ids = hash_blocks(
        prompt, e.block_size, e.model_id, cache_salt=tenants().tenant(tenant).cache_salt
    )
    return loop_thread.run(server.loop.call(lambda eng: eng.prefix_cache_hits(ids)))


def test_no_cross_tenant_hit_and_a_shared_scope_shares(stack, loop_thread):
    url, grpc_addr, pre, dec = stack
    prompt = random.Random(7).choices(range(5, 500), k=80)  # 5 full blocks
    full = len(prompt) // pre.engine.block_size

    cached, text = complete(url, "alpha", prompt)
    assert cached == 0
    # alpha's blocks sit in both engines and the prefill's store shard, under alpha's salt only.
    for s in (pre, dec):
        assert engine_hits(s, loop_thread, prompt, "alpha") == full
        assert engine_hits(s, loop_thread, prompt, "beta") == 0
    alpha_ids = hash_blocks(prompt, pre.engine.block_size, pre.engine.model_id,
                            cache_salt=tenants().tenant("alpha").cache_salt)  # fmt: skip
    assert len(pre.kv.store.lookup(alpha_ids)) == full
    assert not pre.kv.store.lookup(hash_blocks(prompt, pre.engine.block_size, pre.engine.model_id))

    # Another tenant, and a tenant named like a shared scope, get no hit and the same answer.
    assert complete(url, "beta", prompt) == (0, text)
    assert complete(url, "team", prompt) == (0, text)
    # The test can see a hit: alpha's repeat finds its own blocks.
    assert complete(url, "alpha", prompt)[0] > 0
    # A shared scope shares: delta hits what gamma computed, and only gamma made it warm.
    assert complete(url, "gamma", prompt) == (0, text)
    cached, same = complete(url, "delta", prompt)
    assert cached > 0 and same == text

    # The gRPC API salts the same way: beta (warm over HTTP) hits, its own scope; a new prompt
    # from gamma warms the team scope for delta but not for alpha.
    assert grpc_cached(grpc_addr, "beta", prompt) > 0
    other = random.Random(8).choices(range(5, 500), k=48)
    assert grpc_cached(grpc_addr, "gamma", other) == 0
    assert grpc_cached(grpc_addr, "alpha", other) == 0
    assert grpc_cached(grpc_addr, "delta", other) > 0


def test_pool_backend_places_by_the_tenants_own_prefix(tiny_model_dir, redis_url, namespace,
                                                       loop_thread):  # fmt: skip
    """Prefix-aware placement within a tenant: a prefix alpha left on prefill-b draws alpha's
    next request there; beta's same prompt sees no prefix and takes the tie-break (prefill-a)."""
    servers = {
        rid: prefill_server(tiny_model_dir, redis_url, namespace, replica_id=rid)
        for rid in ("prefill-a", "prefill-b")
    }
    servers["decode-a"] = decode_server(tiny_model_dir, redis_url, namespace, replica_id="decode-a")
    for s in servers.values():
        loop_thread.run(s.start())
    try:
        wait_for(lambda: len(list_replicas(redis_url, "prefill", "tiny", namespace)) == 2, 30)
        wait_for(lambda: list_replicas(redis_url, "decode", "tiny", namespace), 30)
        e = servers["prefill-a"].engine
        config = RouterConfig(
            models=(
                ModelRoute(name="tiny", model_dir=str(tiny_model_dir), model_id=e.model_id,
                           block_size=e.block_size, max_model_len=e.max_model_len),
            ),
            cluster=Membership(redis_url=redis_url, namespace=namespace),
            auth=False, refresh_s=0.05,
        )  # fmt: skip
        rng = random.Random(11)
        base = [rng.randrange(5, 500) for _ in range(64)]
        longer = base + [rng.randrange(5, 500) for _ in range(20)]
        salts = {n: tenants().tenant(n).cache_salt for n in ("alpha", "beta")}
        greedy = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)

        def holds(rid: str, prompt: list[int], tenant: str) -> bool:
            ids = hash_blocks(prompt, e.block_size, e.model_id, cache_salt=salts[tenant])
            return len(servers[rid].kv.store.lookup(ids)) == len(ids)

        async def go():
            from router.pd_client import PDClient

            b = servers["prefill-b"]
            async with PDClient(servers["decode-a"].address, b.address, model="tiny") as c:
                async for _ in c.generate(base, greedy, "seed", "alpha", 0, salts["alpha"]):
                    pass
            backend = PoolBackend(config)
            try:
                for tenant in ("alpha", "beta"):
                    async for _ in backend.generate(
                        "tiny", longer, greedy, f"r-{tenant}", tenant=tenant,
                        cache_salt=salts[tenant],
                    ):  # fmt: skip
                        pass
            finally:
                await backend.close()

        loop_thread.run(go())
        assert holds("prefill-b", longer, "alpha") and not holds("prefill-a", longer, "alpha")
        assert holds("prefill-a", longer, "beta") and not holds("prefill-b", longer, "beta")
    finally:
        for s in servers.values():
            loop_thread.run(s.stop(drain_s=1))
