"""The router's path to the model pools: find a model's replicas in the service registry, place
each request (prefix-aware prefill, least-loaded decode: router.placement), and run it through
prefill and decode with the P/D client."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator

import redis

from kvstore.index import IndexReader
from kvstore.registry import Replica, list_replicas
from router.config import ModelRoute, RouterConfig
from router.pd_client import PDClient
from router.placement import Candidate, PrefixAffinity, pick_decode, pick_prefill
from rpc.piece import Piece
from rpc.sampling import Sampling
from services.engine.block_hash import hash_blocks

log = logging.getLogger(__name__)


class NoReplicaError(RuntimeError):
    """No live replica serves the model right now (starting, or all gone): HTTP 503."""


def _roles(info: ModelRoute) -> tuple[str, ...]:
    return ("colocated",) if info.mode == "colocated" else ("prefill", "decode")


class PoolBackend:
    """Make it inside the event loop that will use it (its gRPC channels belong to one loop)."""

    def __init__(self, config: RouterConfig) -> None:
        assert config.cluster.redis_url is not None  # RouterConfig checks it
        self.redis_url: str = config.cluster.redis_url
        self.namespace = config.cluster.namespace
        self.models_info = {m.name: m for m in config.models}
        self.refresh_s = config.refresh_s
        self._replicas: dict[tuple[str, str], tuple[float, list[Replica]]] = {}
        self._clients: dict[tuple[str, str | None], PDClient] = {}
        self._outstanding: dict[str, int] = defaultdict(int)  # prefill replica -> tokens
        self._affinity: dict[str, PrefixAffinity] = defaultdict(PrefixAffinity)
        self._index: IndexReader | None = None

    def outstanding_tokens(self, replica_id: str) -> int:
        """Prompt tokens this router sent to a prefill replica and has no answer for yet."""
        return self._outstanding.get(replica_id, 0)

    def models(self) -> list[tuple[str, int]]:
        return [(m.name, m.max_model_len) for m in self.models_info.values()]

    async def close(self) -> None:
        for c in self._clients.values():
            await c.close()
        if self._index is not None:
            await self._index.close()

    async def _live(self, role: str, model: str, wait_s: float = 10.0) -> list[Replica]:
        """Live replicas of a role; while there are none (starting up, or one restarting),
        wait up to wait_s for one rather than failing the request at once."""
        deadline = time.monotonic() + wait_s
        while True:
            reps = await self._fetch_live(role, model)
            if reps or time.monotonic() >= deadline:
                return reps
            await asyncio.sleep(self.refresh_s)

    async def _fetch_live(self, role: str, model: str) -> list[Replica]:
        """While the registry (Redis) is unreachable, the replicas last seen stay in use (they
        serve without it: a decode replica recomputes what it cannot locate); with none seen,
        NoReplicaError."""
        key = (role, model)
        now = time.monotonic()
        cached = self._replicas.get(key)
        if cached is None or now - cached[0] > self.refresh_s or not cached[1]:
            try:
                reps = await asyncio.to_thread(
                    list_replicas, self.redis_url, role, model, self.namespace
                )
            except redis.RedisError as e:
                if cached is not None and cached[1]:
                    log.warning("registry unreachable, using the %s replicas last seen: %s",
                                role, e)  # fmt: skip
                    return cached[1]
                raise NoReplicaError(
                    f"the cluster's Redis is unreachable and no {role} replica of {model!r} "
                    f"is known yet: {e}"
                ) from None
            self._replicas[key] = cached = (now, reps)
        return cached[1]

    async def readiness(self) -> tuple[bool, str | None]:
        """(whether requests can be served, what is wrong): GET /health's answer. Ready needs
        every model to have a live replica of each role it runs on. With the cluster's Redis
        unreachable, the replicas last seen still serve (ready, degraded) if every role has
        some; not ready otherwise."""
        try:
            await asyncio.to_thread(_ping, self.redis_url)
        except redis.RedisError as e:
            down = f"the cluster's Redis at {self.redis_url} is unreachable: {e}"
            for name, info in self.models_info.items():
                for role in _roles(info):
                    seen = self._replicas.get((role, name))
                    if seen is None or not seen[1]:
                        return False, f"{down}; no {role} replica of {name!r} is known"
            return True, f"{down}; serving with the replicas last seen"
        for name, info in self.models_info.items():
            for role in _roles(info):
                try:
                    if not await self._fetch_live(role, name):
                        return False, f"model {name!r} has no live {role} replica"
                except NoReplicaError as e:
                    return False, str(e)
        return True, None

    def _client(self, decode: str, prefill: str | None, model: str) -> PDClient:
        key = (decode, prefill)
        c = self._clients.get(key)
        if c is None:
            c = self._clients[key] = PDClient(decode, prefill, model=model)
        return c

    async def _prefix_blocks(
        self, info: ModelRoute, prompt: list[int], holders: list[str], salt: str
    ):
        """How many leading prompt blocks each holder has in its KV shard (named under the
        request's cache salt, so only its own scope's blocks count)."""
        ids = hash_blocks(prompt, info.block_size, info.model_id, cache_salt=salt)
        if not ids or not holders:
            return ids, {}
        if self._index is None:
            self._index = IndexReader(self.redis_url, self.namespace)
        try:
            locs = await self._index.locate([b.hex() for b in ids])
        except Exception as e:  # the index is an optimisation; placement works without it
            log.warning("prefix lookup failed: %s", e)
            return ids, {}
        out = {}
        for h in holders:
            n = 0
            while n < len(locs) and h in locs[n]:
                n += 1
            out[h] = n
        return ids, out

    async def generate(
        self,
        model: str,
        prompt_ids: list[int],
        params: Sampling,
        request_id: str,
        tenant: str = "",
        priority: int | None = None,
        cache_salt: str = "",
        **_: object,
    ) -> AsyncIterator[Piece]:
        info = self.models_info[model]
        if info.mode == "colocated":
            reps = await self._live("colocated", model)
            if not reps:
                raise NoReplicaError(f"no colocated replica of {model!r} is up")
            cands = [_cand(r) for r in reps]
            d = pick_decode(cands, None)
            async for piece in self._client(d.address, None, model).generate(
                prompt_ids, params, request_id, tenant, priority or 0, cache_salt
            ):
                yield piece
            return
        pre_reps, dec_reps = await asyncio.gather(
            self._live("prefill", model), self._live("decode", model)
        )
        if not pre_reps or not dec_reps:
            raise NoReplicaError(f"{model!r} has no live prefill or decode replica yet")
        holders = [r.holder_id for r in pre_reps]
        ids, prefix = await self._prefix_blocks(info, prompt_ids, holders, cache_salt)
        p = pick_prefill(
            [
                _cand(r, self._outstanding[r.replica_id], prefix.get(r.holder_id, 0))
                for r in pre_reps
            ]
        )
        affinity = self._affinity[model]
        d = pick_decode([_cand(r) for r in dec_reps], affinity.lookup(ids[:64]))
        affinity.record(ids[:64], d.replica_id)
        self._outstanding[p.replica_id] += len(prompt_ids)
        counted = True
        try:
            async for piece in self._client(d.address, p.address, model).generate(
                prompt_ids, params, request_id, tenant, priority or 0, cache_salt
            ):
                if counted:
                    self._outstanding[p.replica_id] -= len(prompt_ids)
                    counted = False
                yield piece
        finally:
            if counted:
                self._outstanding[p.replica_id] -= len(prompt_ids)


def _ping(url: str) -> None:
    r = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
    try:
        r.ping()
    finally:
        r.close()


def _cand(r: Replica, outstanding: int = 0, prefix: int = 0) -> Candidate:
    return Candidate(
        replica_id=r.replica_id,
        address=r.address,
        running=r.running,
        waiting=r.waiting,
        free_blocks=r.free_blocks,
        total_blocks=r.total_blocks,
        outstanding_tokens=outstanding,
        prefix_blocks=prefix,
    )
