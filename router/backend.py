"""The router's path to the model pools: find a model's replicas in the service registry, place
each request (prefix-aware prefill, least-loaded decode: router.placement), and run it through
prefill and decode with the P/D client."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import defaultdict
from collections.abc import AsyncIterator

import redis

from kvstore.index import IndexReader
from kvstore.registry import Replica, list_replicas
from router.config import ModelRoute, RouterConfig
from router.metrics import RouterMetrics
from router.migration import LostStreamError, Migration, ResumeFailedError, describe
from router.pd_client import Call, PDClient
from router.placement import Candidate, PrefixAffinity, pick_decode, pick_prefill
from rpc.piece import Piece
from rpc.sampling import Sampling
from services.engine.block_hash import hash_blocks

log = logging.getLogger(__name__)


class NoReplicaError(RuntimeError):
    """No live replica serves the model right now (starting, or all gone): HTTP 503."""


# How long a new request waits for a replica of a role while none is live and none was lately
# (the system starting). One that was live within resume_wait_s is being replaced (killed,
# restarting): then a new request waits as long as a resumption would.
FIRST_WAIT_S = 10.0


def _roles(info: ModelRoute) -> tuple[str, ...]:
    return ("colocated",) if info.mode == "colocated" else ("prefill", "decode")


class PoolBackend:
    """Make it inside the event loop that will use it (its gRPC channels belong to one loop)."""

    def __init__(self, config: RouterConfig, metrics: RouterMetrics | None = None) -> None:
        """metrics: where resumptions are counted (router.migration)."""
        assert config.cluster.redis_url is not None  # RouterConfig checks it
        self.redis_url: str = config.cluster.redis_url
        self.namespace = config.cluster.namespace
        self.models_info = {m.name: m for m in config.models}
        self.refresh_s = config.refresh_s
        self.max_resumes = config.max_resumes
        self.resume_wait_s = config.resume_wait_s
        self.metrics = metrics
        self._replicas: dict[tuple[str, str], tuple[float, list[Replica]]] = {}
        self._last_live: dict[tuple[str, str], float] = {}  # when a role last had replicas
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
            if reps:
                self._last_live[key] = now
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
        """The request's pieces. A replica lost on the way (killed, restarting, drained) is
        replaced by another that continues from the tokens delivered (router.migration)."""
        call = Call(prompt_ids, params, request_id, tenant, priority or 0, cache_salt)
        run = Migration(call, self.max_resumes)
        resuming = False  # counted once the continuation delivers
        while True:
            attempt = self._attempt(self.models_info[model], run)
            try:
                async for piece in attempt:
                    if resuming and self.metrics is not None:
                        self.metrics.resumed(model)
                    resuming = False
                    run.deliver(piece)
                    yield piece
                    if piece.finish_reason:
                        return
                raise LostStreamError(f"the {run.role} replica ended the stream unfinished")
            except Exception as e:
                try:
                    run.lose(e)
                except ResumeFailedError:
                    if self.metrics is not None:
                        self.metrics.resume_failed(model)
                    raise
                resuming = True
                log.warning("request %s: %s replica %s lost after %d tokens (%s); resuming",
                            request_id, run.role, run.serving, len(run.delivered),
                            describe(e))  # fmt: skip
            finally:
                await attempt.aclose()

    async def _place(self, run: Migration, role: str, model: str) -> list[Replica]:
        """Live replicas of a role this request has not lost; while there are none, wait for
        one: up to resume_wait_s for a resumption or while a replica is being replaced,
        FIRST_WAIT_S for a new request to a role that had none lately."""
        lately = time.monotonic() - self._last_live.get((role, model), -math.inf)
        replacing = lately <= self.resume_wait_s
        wait_s = self.resume_wait_s if run.resumes or replacing else FIRST_WAIT_S
        deadline = time.monotonic() + wait_s
        while True:
            reps = [r for r in await self._fetch_live(role, model) if r.replica_id not in run.lost]
            if reps:
                return reps
            if time.monotonic() >= deadline:
                if not run.resumes:
                    why = f" (none took over within {wait_s:g} s)" if replacing else ""
                    raise NoReplicaError(f"no live {role} replica of {model!r} is up{why}")
                raise run.failed(f"no other {role} replica was up within {wait_s:g} s")
            await asyncio.sleep(self.refresh_s)

    async def _attempt(self, info: ModelRoute, run: Migration) -> AsyncIterator[Piece]:
        """One attempt: the request from where it stands (nothing delivered: from the start)."""
        model, call = info.name, run.attempt_call()
        resume = list(run.delivered)
        if info.mode == "colocated":
            run.role = "colocated"
            d = pick_decode([_cand(r) for r in await self._place(run, "colocated", model)], None)
            run.serving = d.replica_id
            async for piece in self._client(d.address, None, model).decode_from(call, None, resume):
                yield piece
            return
        if run.handoff is None:  # nothing delivered yet: the prefill hop first
            pre_reps, dec_reps = await asyncio.gather(
                self._place(run, "prefill", model), self._place(run, "decode", model)
            )
            holders = [r.holder_id for r in pre_reps]
            ids, prefix = await self._prefix_blocks(info, call.prompt_ids, holders,
                                                    call.cache_salt)  # fmt: skip
            p = pick_prefill(
                [
                    _cand(r, self._outstanding[r.replica_id], prefix.get(r.holder_id, 0))
                    for r in pre_reps
                ]
            )
            affinity = self._affinity[model]
            d = pick_decode([_cand(r) for r in dec_reps], affinity.lookup(ids[:64]))
            affinity.record(ids[:64], d.replica_id)
            client = self._client(d.address, p.address, model)
            run.role, run.serving = "prefill", p.replica_id
            self._outstanding[p.replica_id] += len(call.prompt_ids)
            try:
                first, run.handoff = await client.prefill_first(call)
            finally:
                self._outstanding[p.replica_id] -= len(call.prompt_ids)
            yield first
            if run.handoff is None:
                return
            resume = []
        else:  # a resumption: decode from the hand-off's KV and the tokens delivered
            reps = await self._place(run, "decode", model)
            d = pick_decode([_cand(r) for r in reps], None)
            client = self._client(d.address, None, model)
        run.role, run.serving = "decode", d.replica_id
        async for piece in client.decode_from(call, run.handoff, resume):
            yield piece


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
