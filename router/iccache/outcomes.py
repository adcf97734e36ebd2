"""Judged outcomes: for each scope, what every arm scored on past requests, kept with the
request's embedding so the router can ask "how did each arm do on requests like this one?".

The bandit's linear context alone (similarity, utility, lengths) cannot tell which kinds of
request the small model gets right; the scores of the nearest past requests can (a question
of a kind the small model answers well, or one of a kind the large model fails too). Each
arm's estimate is the similarity-weighted mean score of its k nearest judged requests,
shrunk towards the arm's prior by a pseudo-count, so an arm with no nearby evidence falls back
to its prior (and the bandit explores it).

Redis is the truth, shared by every router replica: one stream per scope,
`{ns}:icc:{scope}:outcomes`, entries arm, score, emb (float32 bytes), capped at `capacity`
entries. Each replica mirrors a scope's stream into one exact inner-product index per arm,
loaded on first use and followed before every estimate, bounded like the stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import faiss
import numpy as np
import redis.asyncio as aioredis

from router.iccache.follow import Follower

SHARPNESS = 4  # weight = similarity**SHARPNESS: the nearest of the neighbours count most


@dataclass(frozen=True)
class Estimate:
    mean: float  # the arm's expected score here
    evidence: float  # summed weight of the neighbours behind it (0: the prior alone)


@dataclass
class _ArmIndex:
    index: faiss.IndexFlatIP
    scores: list[float] = field(default_factory=list)  # row i's judged score

    def add(self, emb: np.ndarray, score: float, capacity: int) -> None:
        self.index.add(emb[None, :])
        self.scores.append(score)
        if len(self.scores) > capacity + capacity // 4:  # trim rarely, keep the newest
            drop = len(self.scores) - capacity
            self.index.remove_ids(faiss.IDSelectorRange(0, drop))  # later rows move up
            del self.scores[:drop]

    def nearest(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, scores) of the k nearest, or empty arrays."""
        if self.index.ntotal == 0:
            return np.zeros(0), np.zeros(0)
        sims, rows = self.index.search(q[None, :].astype(np.float32), min(k, self.index.ntotal))
        keep = rows[0] >= 0
        return sims[0][keep], np.array([self.scores[r] for r in rows[0][keep]])


@dataclass
class _Mirror:
    arms: dict[str, _ArmIndex]
    last_id: bytes = b"0-0"
    follower: Follower = field(default_factory=Follower)  # a burst of estimates: one read


class OutcomeMemory:
    """Make it inside the event loop that uses it (its Redis client belongs to one loop)."""

    def __init__(
        self, redis_url: str, namespace: str, dim: int, capacity: int, k: int,
        pseudo_count: float,
    ) -> None:  # fmt: skip
        if capacity <= 0 or k <= 0 or pseudo_count <= 0:
            raise ValueError("outcome capacity, k and pseudo_count must be positive")
        self.r = aioredis.Redis.from_url(redis_url)
        self.prefix = f"{namespace}:icc"
        self.dim, self.capacity, self.k, self.pseudo_count = dim, capacity, k, pseudo_count
        self._mirrors: dict[str, _Mirror] = {}

    async def close(self) -> None:
        await self.r.aclose()

    def _key(self, scope: str) -> str:
        if not scope or ":" in scope:
            raise ValueError(f"a scope is a non-empty name without ':', got {scope!r}")
        return f"{self.prefix}:{scope}:outcomes"

    async def record(self, scope: str, arm: str, emb: np.ndarray, score: float) -> None:
        """One judged response; it reaches this replica's mirror at the next estimate."""
        fields = {"arm": arm, "score": repr(float(score)),
                  "emb": np.asarray(emb, "<f4").tobytes()}  # fmt: skip
        await self.r.xadd(self._key(scope), fields, maxlen=self.capacity, approximate=False)

    async def _follow(self, scope: str) -> _Mirror:
        m = self._mirrors.setdefault(scope, _Mirror(arms={}))
        await m.follower.follow(lambda: self._read(scope, m))
        return m

    async def _read(self, scope: str, m: _Mirror) -> None:
        key = self._key(scope)
        while True:
            got = await self.r.xread({key: m.last_id}, count=1000)
            if not got:
                return
            entries = got[0][1]
            for entry_id, f in entries:
                m.last_id = entry_id
                emb = np.frombuffer(f[b"emb"], "<f4")
                if emb.shape != (self.dim,):
                    continue  # written by a replica with another embedding model
                name = f[b"arm"].decode()
                if name not in m.arms:
                    m.arms[name] = _ArmIndex(faiss.IndexFlatIP(self.dim))
                m.arms[name].add(emb.astype(np.float32), float(f[b"score"]), self.capacity)
            if len(entries) < 1000:
                return

    async def estimate(
        self, scopes: list[str], emb: np.ndarray, priors: dict[str, float]
    ) -> dict[str, Estimate]:
        """Per arm (the keys of priors): the weighted mean score of its k nearest judged
        requests over the given scopes, with the prior counted as pseudo_count neighbours."""
        sims: dict[str, list[np.ndarray]] = {a: [] for a in priors}
        scores: dict[str, list[np.ndarray]] = {a: [] for a in priors}
        for scope in scopes:
            m = await self._follow(scope)
            for arm in priors:
                if arm in m.arms:
                    s, sc = m.arms[arm].nearest(emb, self.k)
                    sims[arm].append(s)
                    scores[arm].append(sc)
        out = {}
        for arm, prior in priors.items():
            s = np.concatenate(sims[arm]) if sims[arm] else np.zeros(0)
            sc = np.concatenate(scores[arm]) if scores[arm] else np.zeros(0)
            top = np.argsort(-s)[: self.k]
            w = np.clip(s[top], 0.0, 1.0) ** SHARPNESS
            mean = (w @ sc[top] + self.pseudo_count * prior) / (w.sum() + self.pseudo_count)
            out[arm] = Estimate(float(mean), float(w.sum()))
        return out
