"""The example store: per scope (a tenant, or the opt-in shared pool) the (request, response,
embedding, statistics) of past large-model answers, in Redis so every router replica shares
them, with an in-process exact inner-product index (faiss) over the embeddings.

Redis is the truth. Keys under `{ns}:icc:`:
    seq                        example ids (INCR)
    {scope}:ex:{id}            hash: request, response, model, emb (float32 bytes), tokens,
                               created, uses, gain_sum, gain_n
    {scope}:ids                set of live ids
    {scope}:log                stream of changes: op=add|del, id
A write stores the example and its id before it appends to the log (a reader that sees the
log entry finds the data); a delete removes the id from the set before the data. Each replica
loads a scope once (the log's last id first, then the data, so nothing written meanwhile is
missed: replaying an add it already has is a no-op) and then follows the log before every
search, so its index agrees with Redis.

Capacity per scope is a 0/1 knapsack: keep the examples of highest value per byte (value: the
expected offloading gain, reuse x mean judged gain) that fit; eviction drops the rest.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import faiss
import numpy as np
import redis.asyncio as aioredis

from router.iccache.follow import Follower

PRIOR_GAIN = 0.5  # an example's judged gain before any feedback
LOG_MAXLEN = 100_000


@dataclass
class Example:
    id: int
    scope: str
    request: str
    response: str
    model: str
    emb: np.ndarray  # [dim] float32, norm 1
    tokens: int  # the example's prompt cost when prepended (request + response tokens, approx.)
    created: float = 0.0
    uses: int = 0
    gain_sum: float = 0.0
    gain_n: int = 0

    @property
    def nbytes(self) -> int:
        return len(self.request.encode()) + len(self.response.encode()) + self.emb.nbytes

    @property
    def mean_gain(self) -> float:
        return (self.gain_sum + PRIOR_GAIN) / (self.gain_n + 1)

    @property
    def value(self) -> float:
        """Expected offloading value: how often it is reused times how much it helps."""
        return (1 + self.uses) * self.mean_gain

    def to_redis(self) -> dict[str, bytes | str | int | float]:
        return {
            "request": self.request, "response": self.response, "model": self.model,
            "emb": self.emb.astype("<f4").tobytes(), "tokens": self.tokens,
            "created": self.created, "uses": self.uses, "gain_sum": self.gain_sum,
            "gain_n": self.gain_n,
        }  # fmt: skip

    @classmethod
    def from_redis(cls, eid: int, scope: str, h: dict[bytes, bytes]) -> Example:
        s = {k.decode(): v for k, v in h.items()}
        return cls(
            id=eid, scope=scope, request=s["request"].decode(), response=s["response"].decode(),
            model=s["model"].decode(), emb=np.frombuffer(s["emb"], "<f4").astype(np.float32),
            tokens=int(s["tokens"]), created=float(s["created"]), uses=int(s.get("uses", 0)),
            gain_sum=float(s.get("gain_sum", 0.0)), gain_n=int(s.get("gain_n", 0)),
        )  # fmt: skip


@dataclass(frozen=True)
class Hit:
    example: Example
    similarity: float


class _ScopeIndex:
    """One scope's mirror: examples by id and an exact inner-product index over them. A plain
    flat index with the ids kept alongside (row i is ids[i]): faiss's id-mapping wrapper
    translates each result in an OpenMP parallel region, and waking the threads for a
    handful of ids cost ~6 ms a search on a busy 2-core machine (0.1 ms without)."""

    def __init__(self, dim: int) -> None:
        self.index = faiss.IndexFlatIP(dim)
        self.ids = np.zeros(0, np.int64)
        self.examples: dict[int, Example] = {}
        self.log_id = b"0-0"

    def add(self, ex: Example) -> None:
        if ex.id in self.examples:
            return
        self.examples[ex.id] = ex
        self.index.add(ex.emb[None, :])
        self.ids = np.append(self.ids, ex.id)

    def remove(self, eid: int) -> None:
        if self.examples.pop(eid, None) is not None:
            row = np.flatnonzero(self.ids == eid)
            self.index.remove_ids(row.astype(np.int64))  # later rows move up, in order
            self.ids = np.delete(self.ids, row)

    def search(self, q: np.ndarray, k: int) -> list[tuple[int, float]]:
        n = min(k, self.index.ntotal)
        if n == 0:
            return []
        sims, rows = self.index.search(q[None, :].astype(np.float32), n)
        return [(int(self.ids[r]), float(s)) for r, s in zip(rows[0], sims[0], strict=True)
                if r >= 0]  # fmt: skip


class ExampleStore:
    """Make it inside the event loop that uses it (its Redis client belongs to one loop)."""

    def __init__(self, redis_url: str, namespace: str, dim: int, capacity_bytes: int) -> None:
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be positive, got {capacity_bytes}")
        self.r = aioredis.Redis.from_url(redis_url)
        self.prefix = f"{namespace}:icc"
        self.dim = dim
        self.capacity_bytes = capacity_bytes
        self._scopes: dict[str, _ScopeIndex] = {}
        self._followers: dict[str, Follower] = {}

    async def close(self) -> None:
        await self.r.aclose()

    def _key(self, scope: str, *rest: str | int) -> str:
        if not scope or ":" in scope:
            raise ValueError(f"a scope is a non-empty name without ':', got {scope!r}")
        return ":".join((self.prefix, scope, *map(str, rest)))

    async def _mirror(self, scope: str) -> _ScopeIndex:
        """The scope's mirror, loaded on first use and brought up to date with the log (one
        reader at a time; a burst of searches shares one read: follow.py)."""
        await self._followers.setdefault(scope, Follower()).follow(lambda: self._load(scope))
        return self._scopes[scope]

    async def _load(self, scope: str) -> None:
        idx = self._scopes.get(scope)
        if idx is None:
            idx = _ScopeIndex(self.dim)
            last = await self.r.xrevrange(self._key(scope, "log"), count=1)
            idx.log_id = last[0][0] if last else b"0-0"
            ids = sorted(int(x) for x in await self.r.smembers(self._key(scope, "ids")))
            for ex in await self._fetch(scope, ids):
                idx.add(ex)
            self._scopes[scope] = idx
        await self._follow(scope, idx)

    async def _fetch(self, scope: str, ids: list[int]) -> list[Example]:
        if not ids:
            return []
        p = self.r.pipeline(transaction=False)
        for eid in ids:
            p.hgetall(self._key(scope, "ex", eid))
        return [
            Example.from_redis(eid, scope, h)
            for eid, h in zip(ids, await p.execute(), strict=True)
            if h
        ]

    async def _follow(self, scope: str, idx: _ScopeIndex) -> None:
        log = self._key(scope, "log")
        while True:
            got = await self.r.xread({log: idx.log_id}, count=1000)
            if not got:
                return
            entries = got[0][1]
            adds = []
            for entry_id, fields in entries:
                idx.log_id = entry_id
                eid = int(fields[b"id"])
                if fields[b"op"] == b"add":
                    adds.append(eid)
                else:
                    idx.remove(eid)
            for ex in await self._fetch(scope, adds):
                if ex.id not in idx.examples:
                    idx.add(ex)
            if len(entries) < 1000:
                return

    async def add(self, ex: Example) -> Example:
        """Store ex in its scope (a fresh id), then evict down to capacity. Returns ex with
        its id; it may be among the evicted if its value per byte is the lowest."""
        ex.id = int(await self.r.incr(f"{self.prefix}:seq"))
        ex.created = ex.created or time.time()
        p = self.r.pipeline(transaction=True)
        p.hset(self._key(ex.scope, "ex", ex.id), mapping=ex.to_redis())
        p.sadd(self._key(ex.scope, "ids"), ex.id)
        p.sadd(f"{self.prefix}:scopes", ex.scope)
        p.xadd(self._key(ex.scope, "log"), {"op": "add", "id": ex.id}, maxlen=LOG_MAXLEN)
        await p.execute()
        await self.evict(ex.scope)
        return ex

    async def remove(self, scope: str, eid: int) -> None:
        p = self.r.pipeline(transaction=True)
        p.srem(self._key(scope, "ids"), eid)
        p.delete(self._key(scope, "ex", eid))
        p.xadd(self._key(scope, "log"), {"op": "del", "id": eid}, maxlen=LOG_MAXLEN)
        await p.execute()
        idx = self._scopes.get(scope)
        if idx is not None:
            idx.remove(eid)

    async def evict(self, scope: str) -> list[int]:
        """Keep the knapsack's greedy solution (highest value per byte first) within capacity;
        remove the rest. Statistics are read fresh from Redis (other replicas update them)."""
        idx = await self._mirror(scope)
        if sum(e.nbytes for e in idx.examples.values()) <= self.capacity_bytes:
            return []
        fresh = await self._fetch(scope, sorted(idx.examples))
        ranked = sorted(fresh, key=lambda e: (e.value / e.nbytes, e.id), reverse=True)
        used, dropped = 0, []
        for e in ranked:
            if used + e.nbytes <= self.capacity_bytes:
                used += e.nbytes
            else:
                dropped.append(e.id)
        for eid in dropped:
            await self.remove(scope, eid)
        return dropped

    async def search(self, scopes: list[str], q: np.ndarray, k: int) -> list[Hit]:
        """The k most similar examples over the given scopes (only those), best first."""
        hits: list[Hit] = []
        for scope in scopes:
            idx = await self._mirror(scope)
            hits += [Hit(idx.examples[i], s) for i, s in idx.search(q, k) if i in idx.examples]
        hits.sort(key=lambda h: h.similarity, reverse=True)
        return hits[:k]

    async def scopes(self) -> set[str]:
        """Every scope that has held an example."""
        return {s.decode() for s in await self.r.smembers(f"{self.prefix}:scopes")}

    async def ids(self, scope: str) -> set[int]:
        """The scope's ids in this replica's index (after following the log)."""
        return set((await self._mirror(scope)).examples)

    async def redis_ids(self, scope: str) -> set[int]:
        return {int(x) for x in await self.r.smembers(self._key(scope, "ids"))}

    async def record_use(self, scope: str, eids: list[int]) -> None:
        p = self.r.pipeline(transaction=False)
        for eid in eids:
            p.hincrby(self._key(scope, "ex", eid), "uses", 1)
        await p.execute()
        self._update_local(scope, eids, uses=1)

    async def record_gain(self, scope: str, eids: list[int], gain: float) -> None:
        if not math.isfinite(gain):
            raise ValueError(f"gain must be finite, got {gain}")
        p = self.r.pipeline(transaction=False)
        for eid in eids:
            key = self._key(scope, "ex", eid)
            # Only for examples still there: a hash re-created by HINCRBY would be a ghost.
            p.exists(key)
        alive = [e for e, ok in zip(eids, await p.execute(), strict=True) if ok]
        p = self.r.pipeline(transaction=False)
        for eid in alive:
            key = self._key(scope, "ex", eid)
            p.hincrbyfloat(key, "gain_sum", gain)
            p.hincrby(key, "gain_n", 1)
        await p.execute()
        self._update_local(scope, alive, gain=gain)

    async def replace_response(self, scope: str, eid: int, response: str, tokens: int) -> None:
        """A replayed example's better response; its judged gain starts over."""
        key = self._key(scope, "ex", eid)
        if not await self.r.exists(key):
            return
        mapping = {"response": response, "tokens": tokens, "gain_sum": 0.0, "gain_n": 0}
        await self.r.hset(key, mapping=mapping)
        idx = self._scopes.get(scope)
        if idx is not None and eid in idx.examples:
            ex = idx.examples[eid]
            ex.response, ex.tokens, ex.gain_sum, ex.gain_n = response, tokens, 0.0, 0

    def _update_local(
        self, scope: str, eids: list[int], uses: int = 0, gain: float | None = None
    ) -> None:
        idx = self._scopes.get(scope)
        for eid in eids:
            ex = idx.examples.get(eid) if idx is not None else None
            if ex is not None:
                ex.uses += uses
                if gain is not None:
                    ex.gain_sum += gain
                    ex.gain_n += 1

    async def examples(self, scope: str) -> list[Example]:
        return list((await self._mirror(scope)).examples.values())
