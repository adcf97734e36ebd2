"""IC-Cache's judged-outcome memory on a real Redis (per-arm estimates from similar past
requests, tenant scopes, shared by replicas, bounded), the router learning from it which kind
of request the small model answers, and the embedding batcher. Embeddings in the first parts
are made-up unit vectors: what is tested is the bookkeeping and the learning, not the model."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from router.iccache.bandit import ContextualBandit, context, own_estimate_prior
from router.iccache.config import ARMS
from router.iccache.outcomes import OutcomeMemory

DIM = 8
PRIORS = dict(zip(ARMS, (0.55, 0.3, 0.7), strict=True))


def unit(*xs: float) -> np.ndarray:
    v = np.zeros(DIM, np.float32)
    v[: len(xs)] = xs
    return v / np.linalg.norm(v)


def memory(redis_url: str, namespace: str, capacity: int = 1000) -> OutcomeMemory:
    return OutcomeMemory(redis_url, namespace, DIM, capacity, k=8, pseudo_count=2.0)


def test_estimates_follow_similar_outcomes_within_a_scope(redis_url: str, namespace: str):
    async def body():
        m = memory(redis_url, namespace)
        q = unit(1, 0.1)
        est = await m.estimate(["alice"], q, PRIORS)
        assert {a: e.mean for a, e in est.items()} == pytest.approx(PRIORS)
        assert all(e.evidence == 0 for e in est.values())
        for k in range(6):  # near q the small model failed, the large one succeeded
            await m.record("alice", "small+examples", unit(1, 0.05 * k), 0.0)
            await m.record("alice", "large", unit(1, 0.05 * k), 1.0)
        await m.record("alice", "small+examples", unit(0, 1), 1.0)  # far away: weight ~0
        est = await m.estimate(["alice"], q, PRIORS)
        assert est["small+examples"].mean < 0.3 < 0.85 < est["large"].mean
        assert est["small"].mean == pytest.approx(PRIORS["small"])  # no evidence for it
        assert est["large"].evidence > 3
        other = await m.estimate(["bob"], q, PRIORS)  # another tenant sees none of it
        assert {a: e.mean for a, e in other.items()} == pytest.approx(PRIORS)
        # Another router replica, started later, reads the same outcomes from Redis.
        m2 = memory(redis_url, namespace)
        est2 = await m2.estimate(["alice"], q, PRIORS)
        assert {a: e.mean for a, e in est2.items()} == pytest.approx(
            {a: e.mean for a, e in est.items()}
        )
        await m.close()
        await m2.close()

    asyncio.run(body())


def test_memory_is_bounded_and_keeps_the_newest(redis_url: str, namespace: str):
    async def body():
        m = memory(redis_url, namespace, capacity=40)
        q = unit(1)
        for k in range(100):
            await m.record("t", "large", q, k / 100)
        await m.estimate(["t"], q, PRIORS)  # a replica that follows the stream as it grows
        for k in range(100, 140):
            await m.record("t", "large", q, k / 100)
        await m.estimate(["t"], q, PRIORS)
        assert await m.r.xlen(m._key("t")) == 40  # the stream keeps the newest 40
        kept = m._mirrors["t"].arms["large"].scores
        assert 40 <= len(kept) <= 50  # so does the mirror (rebuilt past 1.25x)
        assert kept == pytest.approx([k / 100 for k in range(140 - len(kept), 140)])
        await m.close()

    asyncio.run(body())


def test_concurrent_estimates_read_each_outcome_once(redis_url: str, namespace: str):
    """A burst of decisions estimates concurrently: the mirror still holds each judged
    outcome once, so the k nearest are k different requests, not copies of one."""

    async def body():
        m = memory(redis_url, namespace)
        for k in range(10):
            await m.record("t", "large", unit(1, 0.1 * k), k / 10)
        await asyncio.gather(*(m.estimate(["t"], unit(1), PRIORS) for _ in range(32)))
        for k in range(10, 15):  # more arrive between bursts
            await m.record("t", "large", unit(1, 0.1 * k), k / 10)
        await asyncio.gather(*(m.estimate(["t"], unit(1), PRIORS) for _ in range(32)))
        assert m._mirrors["t"].follower.started <= 4  # per burst: the first caller's, one more
        arm = m._mirrors["t"].arms["large"]
        assert arm.index.ntotal == 15
        assert arm.scores == pytest.approx([k / 10 for k in range(15)])
        await m.close()

    asyncio.run(body())


def test_bad_scope_and_knobs_are_refused(redis_url: str, namespace: str):
    with pytest.raises(ValueError, match="positive"):
        OutcomeMemory(redis_url, namespace, DIM, 0, 8, 2.0)

    async def body():
        m = memory(redis_url, namespace)
        with pytest.raises(ValueError, match="scope"):
            await m.record("a:b", "large", unit(1), 1.0)
        await m.close()

    asyncio.run(body())


def test_router_learns_which_kind_of_request_the_small_model_answers(
    redis_url: str, namespace: str
) -> None:
    """Two kinds of request look alike to the bandit's generic features (same similarity,
    utility and length) but not to the outcome memory: on kind A small+examples is always
    right, on kind B always wrong; the large model scores 0.7 on both. Rewards: quality minus
    the arm's cost (large 0.2). After a stream with feedback, A goes to small+examples and B
    to large."""
    cost_list = (0.05, 0.0, 0.2)
    costs = dict(zip(ARMS, cost_list, strict=True))
    rng = np.random.default_rng(0)

    def request(kind: str) -> np.ndarray:
        base = unit(1, 0, 0.1) if kind == "A" else unit(0, 1, 0.1)
        v = base + rng.normal(0, 0.05, DIM).astype(np.float32)
        return v / np.linalg.norm(v)

    def quality(kind: str, arm: str) -> float:
        return {"small+examples": float(kind == "A"), "small": 0.0, "large": 0.7}[arm]

    async def body():
        m = memory(redis_url, namespace)
        bandit = ContextualBandit(
            ARMS, own_estimate_prior(cost_list), "linucb", alpha=0.3, ridge=4.0
        )

        async def decide(q: np.ndarray):
            est = await m.estimate(["t"], q, PRIORS)
            x = context(0.8, 0.5, 2, 4, 60, tuple(est[a].mean for a in ARMS))
            bonus = {a: 0.5 / np.sqrt(e.evidence + 2.0) for a, e in est.items()}
            return bandit.choose(x, ARMS, bonus)[0], x

        for _ in range(120):
            kind = "A" if rng.random() < 0.5 else "B"
            q = request(kind)
            arm, x = await decide(q)
            score = quality(kind, arm)
            bandit.update(arm, x, score - costs[arm])
            await m.record("t", arm, q, score)
        picks_a = [(await decide(request("A")))[0] for _ in range(20)]
        picks_b = [(await decide(request("B")))[0] for _ in range(20)]
        assert picks_a.count("small+examples") >= 18, picks_a
        assert picks_b.count("large") >= 18, picks_b
        await m.close()

    asyncio.run(body())


@pytest.fixture(scope="module")
def embedder():
    from services.embedder import Embedder
    from splitserve.embed_pull import pull_embedder

    return Embedder(pull_embedder(), threads=1)


def test_concurrent_embed_calls_share_batches_and_keep_their_rows(embedder) -> None:
    from services.embedder import MAX_TEXTS, BatchingEmbedder

    texts = [f"The capital of country number {k} is" for k in range(12)]
    alone = embedder.embed(texts)
    passes = []

    class Counting:
        def embed(self, ts):
            passes.append(len(ts))
            return embedder.embed(ts)

    async def body():
        with ThreadPoolExecutor(1) as pool:
            b = BatchingEmbedder(Counting(), pool)  # type: ignore[arg-type]
            got = await asyncio.gather(
                *(b.embed([t]) for t in texts[:8]), b.embed(texts[8:]), b.embed([])
            )
            with pytest.raises(ValueError, match="at most"):
                await b.embed(["x"] * (MAX_TEXTS + 1))
            return got

    got = asyncio.run(body())
    assert np.allclose(np.concatenate(got[:9]), alone, atol=1e-5)
    assert got[9].shape == (0, embedder.dim)
    assert sum(passes) == 12 and len(passes) < 9  # batched: fewer passes than calls


def test_an_embedding_failure_reaches_its_callers_and_the_next_batch_runs(embedder) -> None:
    from services.embedder import BatchingEmbedder

    class Flaky:
        calls = 0

        def embed(self, ts):
            Flaky.calls += 1
            if Flaky.calls == 1:
                raise RuntimeError("out of memory")
            return embedder.embed(ts)

    async def body():
        with ThreadPoolExecutor(1) as pool:
            b = BatchingEmbedder(Flaky(), pool)  # type: ignore[arg-type]
            with pytest.raises(RuntimeError, match="out of memory"):
                await b.embed(["first"])
            return await b.embed(["second"])

    assert asyncio.run(body()).shape == (1, embedder.dim)
