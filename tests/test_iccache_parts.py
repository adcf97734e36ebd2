"""IC-Cache's parts on a real Redis: the example store (tenant scopes, the index against Redis
after a restart and across replicas, knapsack eviction), the manager's admission rules, the
selector and the bandit on synthetic rewards. Embeddings here are made-up unit vectors: what
is tested is the bookkeeping, not the model."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from router.iccache.bandit import ContextualBandit
from router.iccache.config import ARMS, ICCacheConfig, ICRoute
from router.iccache.load import LoadWatch, load_penalty
from router.iccache.manager import SHARED_SCOPE, ExampleManager, scopes_for
from router.iccache.selector import Selector
from router.iccache.store import Example, ExampleStore, Hit

DIM = 8


def unit(*xs: float) -> np.ndarray:
    v = np.zeros(DIM, np.float32)
    v[: len(xs)] = xs
    return v / np.linalg.norm(v)


def run(coro):
    return asyncio.run(coro)


def example(scope: str, emb: np.ndarray, text: str = "q", answer: str = "a") -> Example:
    return Example(0, scope, text, answer, "large", emb, tokens=10)


def test_scopes_never_cross_tenants(redis_url: str, namespace: str) -> None:
    async def body():
        store = ExampleStore(redis_url, namespace, DIM, 1 << 20)
        m = ExampleManager(store, shared_tenants=("carol", "dave"))
        e = unit(1, 0)
        for tenant in ("alice", "bob", "carol"):
            got = await m.admit(
                tenant=tenant,
                request=f"{tenant} asks",
                response="answer",
                emb=e,
                model="L",
                large="L",
                finish_reason="stop",
                tokens=5,
            )
            assert got.admitted, got
        hits = await store.search(scopes_for("alice", ("carol", "dave")), e, 10)
        assert [h.example.request for h in hits] == ["alice asks"]
        # carol opted in: her example is in the shared pool, which dave (also opted in) sees
        # and bob (not opted in) does not.
        assert [
            h.example.scope
            for h in await store.search(scopes_for("dave", ("carol", "dave")), e, 10)
        ] == [SHARED_SCOPE]
        assert [h.example.request for h in await store.search(scopes_for("bob", ()), e, 10)] == [
            "bob asks"
        ]
        await store.close()

    run(body())


def test_admission_rules(redis_url: str, namespace: str) -> None:
    async def body():
        store = ExampleStore(redis_url, namespace, DIM, 1 << 20)
        m = ExampleManager(store)
        kw = dict(tenant="t", request="What is 2+2?", emb=unit(1), large="L", tokens=5)
        refused = [
            await m.admit(**kw, response="4", model="S", finish_reason="stop"),  # small model
            await m.admit(**kw, response="4 is the ans", model="L", finish_reason="length"),
            await m.admit(**kw, response="", model="L", finish_reason="abort"),
            await m.admit(**kw, response="boom", model="L", finish_reason=None),  # an error
            await m.admit(**kw, response="   ", model="L", finish_reason="stop"),
        ]
        assert [a.admitted for a in refused] == [False] * 5
        assert await store.redis_ids("t") == set()
        ok = await m.admit(**kw, response="4", model="L", finish_reason="stop")
        assert ok.admitted
        again = await m.admit(**kw, response="four", model="L", finish_reason="stop")
        assert not again.admitted and "near-identical" in again.reason
        assert await store.redis_ids("t") == {ok.example_id}
        await store.close()

    run(body())


def test_index_agrees_with_redis_after_restart_and_across_replicas(
    redis_url: str, namespace: str
) -> None:
    async def body():
        a = ExampleStore(redis_url, namespace, DIM, 1 << 20)
        b = ExampleStore(redis_url, namespace, DIM, 1 << 20)  # another router replica
        ids = []
        for k in range(6):
            ids.append((await a.add(example("t", unit(1, k / 3), f"q{k}"))).id)
        assert await b.ids("t") == set(ids) == await a.redis_ids("t")
        await b.remove("t", ids[0])
        await a.add(example("t", unit(0, 1), "late"))
        assert await a.ids("t") == await a.redis_ids("t") == await b.ids("t")
        q = unit(1, 0.4)
        want = [(h.example.id, round(h.similarity, 5)) for h in await a.search(["t"], q, 4)]
        await a.close()
        restarted = ExampleStore(redis_url, namespace, DIM, 1 << 20)
        assert await restarted.ids("t") == await restarted.redis_ids("t")
        got = [(h.example.id, round(h.similarity, 5)) for h in await restarted.search(["t"], q, 4)]
        assert got == want
        await b.close()
        await restarted.close()

    run(body())


def test_a_burst_of_searches_shares_one_read_of_the_log(redis_url: str, namespace: str) -> None:
    """Another replica's additions reach a burst of concurrent searches through one read of
    the scope's log (not one per search), and every search sees them."""

    async def body():
        a = ExampleStore(redis_url, namespace, DIM, 1 << 20)
        b = ExampleStore(redis_url, namespace, DIM, 1 << 20)
        await b.search(["t"], unit(1), 4)  # b follows the scope from here
        for k in range(5):
            await a.add(example("t", unit(1, k / 5), f"q{k}"))
        before = b._followers["t"].started
        got = await asyncio.gather(*(b.search(["t"], unit(1), 8) for _ in range(32)))
        assert all(len(hits) == 5 for hits in got)
        assert b._followers["t"].started - before <= 2  # the first caller's, then one for the rest
        assert len(b._scopes["t"].examples) == 5 == b._scopes["t"].index.ntotal
        await a.close()
        await b.close()

    run(body())


def test_capacity_is_a_knapsack_by_value_per_byte(redis_url: str, namespace: str) -> None:
    async def body():
        one = example("t", unit(1), "x" * 100, "y" * 100).nbytes
        store = ExampleStore(redis_url, namespace, DIM, capacity_bytes=3 * one)
        kept = [await store.add(example("t", unit(1, k), "x" * 100, "y" * 100)) for k in range(3)]
        await store.record_use("t", [kept[0].id, kept[0].id, kept[2].id])
        await store.record_gain("t", [kept[0].id], 1.0)
        # A fourth of equal size and no reuse has the lowest value per byte of the four
        # except kept[1] (equal: the older id goes first); kept[0] and kept[2] stay.
        fourth = await store.add(example("t", unit(1, 5), "x" * 100, "y" * 100))
        left = await store.redis_ids("t")
        assert len(left) == 3 and {kept[0].id, kept[2].id} <= left
        assert left == await store.ids("t")
        assert kept[1].id not in left and fourth.id in left
        await store.close()

    run(body())


def test_selector_pays_for_prompt_length_and_skips_duplicates() -> None:
    sel = Selector(max_examples=3, min_similarity=0.3, token_cost=0.001)
    e1 = Example(1, "t", "a", "b", "L", unit(1, 0), tokens=50)
    dup = Example(2, "t", "a'", "b", "L", unit(1, 0.01), tokens=50)
    long = Example(3, "t", "c", "d", "L", unit(1, 1), tokens=5000)  # 5 utility of prompt cost
    far = Example(4, "t", "e", "f", "L", unit(0, 1), tokens=10)
    hits = [Hit(e1, 0.9), Hit(dup, 0.89), Hit(long, 0.8), Hit(far, 0.1)]
    assert [c.hit.example.id for c in sel.select(hits)] == [1]
    # Feedback that examples like e1 do not help drives its utility below the threshold.
    for _ in range(50):
        sel.learn([c.x for c in sel.select(hits)], 0.0)
    assert sel.select(hits) == []


@pytest.mark.parametrize("kind", ["linucb", "thompson"])
def test_bandit_learns_the_better_arm(kind: str) -> None:
    """Synthetic reward: small+examples' quality grows with the best example's similarity
    (0.2 + 0.9 sim), the large model's is 0.7 whatever the context, the small model alone's
    0.1: small+examples is the better arm above sim 0.56, the large one below."""
    rng = np.random.default_rng(0)
    bandit = ContextualBandit(ARMS, (0.5, 0.5, 0.5), kind, alpha=0.3, seed=1, dim=5)

    def reward(arm: str, sim: float) -> float:
        quality = {"small+examples": 0.2 + 0.9 * sim, "small": 0.1, "large": 0.7}
        return quality[arm] + rng.normal(0, 0.05)

    def ctx(sim: float) -> np.ndarray:
        return np.array([1.0, sim, sim, 0.5, 0.3])

    for _ in range(600):
        sim = float(rng.uniform(0, 1))
        arm, _ = bandit.choose(ctx(sim), ARMS)
        bandit.update(arm, ctx(sim), reward(arm, sim))
    picks_hi = [bandit.choose(ctx(0.95), ARMS)[0] for _ in range(20)]
    picks_lo = [bandit.choose(ctx(0.05), ARMS)[0] for _ in range(20)]
    assert picks_hi.count("small+examples") >= 18, picks_hi
    assert picks_lo.count("large") >= 18, picks_lo


def test_load_penalty_shifts_traffic_off_the_large_model() -> None:
    bandit = ContextualBandit(ARMS, (0.6, 0.2, 0.7), "linucb", alpha=0.0, dim=5)
    x = np.array([1.0, 0.8, 0.8, 0.5, 0.3])
    watch = LoadWatch(beta=0.5)
    assert bandit.choose(x, ARMS, {"large": -load_penalty(watch.ema["L"], 4, 0.6)})[0] == "large"
    for _ in range(20):
        watch.start("L")
    assert watch.ema["L"] > 8
    pen = load_penalty(watch.ema["L"], 4, 0.6)
    assert 0.3 < pen <= 0.6
    assert bandit.choose(x, ARMS, {"large": -pen})[0] == "small+examples"


def test_config_errors() -> None:
    r = ICRoute(name="auto", small="s", large="l")
    with pytest.raises(ValueError, match="differ"):
        ICRoute(name="auto", small="s", large="s")
    with pytest.raises(ValueError, match="duplicate"):
        ICCacheConfig(routes=(r, r))
    with pytest.raises(ValueError, match="bandit"):
        ICCacheConfig(routes=(r,), bandit="greedy")  # type: ignore[arg-type]


def test_replay_replaces_only_what_the_judge_prefers(redis_url: str, namespace: str) -> None:
    """The manager's replay order and rules, with the generator and judge as plain functions:
    the most reused low-gain examples first, within the budget; a cut or unchanged answer is
    never taken; a preferred one replaces the stored answer and its gain starts over."""

    async def body():
        store = ExampleStore(redis_url, namespace, DIM, 1 << 20)
        m = ExampleManager(store)
        exs = [await store.add(example("t", unit(1, k), f"q{k}", f"old{k}")) for k in range(4)]
        for k, ex in enumerate(exs):
            for _ in range(k):  # q3 the most reused, q0 never
                await store.record_use("t", [ex.id])
        for ex in exs:
            await store.record_gain("t", [ex.id], 0.0)
        await store.record_gain("t", [exs[3].id], 1.0)  # q3 helps: mean gain 0.5, not below
        await store.record_gain("t", [exs[3].id], 1.0)
        asked = []

        async def regenerate(ex):
            asked.append(ex.request)
            return {"q2": ("new2", "stop", 5), "q1": ("new1", "length", 5),
                    "q0": (ex.response, "stop", 5)}[ex.request]  # fmt: skip

        async def prefer(ex, new):
            return True

        replaced = await m.replay("t", regenerate, prefer, budget=3)
        got = {e.request: e for e in await store.examples("t")}
        await store.close()
        return asked, replaced, got, exs

    asked, replaced, got, exs = run(body())
    assert asked == ["q2", "q1", "q0"]  # most reused first; q3 is helpful, not asked
    assert replaced == [exs[2].id]
    assert got["q2"].response == "new2" and got["q2"].gain_n == 0
    assert got["q1"].response == "old1" and got["q0"].response == "old0"
