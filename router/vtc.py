"""Fair admission across tenants: the Virtual Token Counter (VTC, Sheng et al., OSDI'24), with
the counters in Redis so that every router replica orders by the same standing.

Each tenant u has a counter c[u], the weighted service it received divided by its share:
`input_weight` per prompt token computed (prefix-cache hits are refunded when the usage reports
them) plus `output_weight` per output token, charged as decode streams them. A router holds at
most `max_inflight` of its requests in the pools at once; when a slot is free it admits the
head of the waiting tenant with the smallest counter (work-conserving: a slot never idles while
anyone waits). A tenant that becomes backlogged again has its counter lifted to the smallest
counter among the tenants backlogged now (on any replica), or to that of the last tenant to
leave the backlog (its counter now), so it cannot bank credit while idle.

Redis keys (prefix `{namespace}:vtc:`): `c` (hash tenant -> counter), `routers` (zset router
id -> lease expiry, ms), `q:{router}` (hash tenant -> requests waiting on that router, with a
TTL) and `last` (the last tenant to leave the backlog). Lifts and admissions are
Lua scripts, charges HINCRBYFLOAT: atomic, so replicas never lose an update, and a restarted
router finds every counter where it was. A router that dies stops renewing its lease; its
waiting requests then stop counting as backlog.

order "fcfs" keeps the same capacity and accounting but admits in arrival order (the baseline
VTC is measured against).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

import redis.asyncio as aredis

log = logging.getLogger(__name__)

# The tenants backlogged now on any live router (each router's queue: tenant -> waiting).
_BACKLOGGED = """
local backlogged = {}
for _, r in ipairs(redis.call('ZRANGE', routers, 0, -1)) do
  local q = redis.call('HGETALL', prefix .. r)
  for i = 1, #q, 2 do
    if tonumber(q[i + 1]) > 0 then backlogged[q[i]] = true end
  end
end
"""

# KEYS: counters, routers, this router's queue, last; ARGV: router id, tenant, now ms, ttl ms,
# queue key prefix. Joins the tenant's backlog; lifts its counter if it was not backlogged.
_ENQUEUE = (
    """
local c, routers, myq, last = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local rid, u, now, ttl, prefix = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
redis.call('ZREMRANGEBYSCORE', routers, '-inf', now)
redis.call('ZADD', routers, now + ttl, rid)
"""
    + _BACKLOGGED
    + """redis.call('HINCRBY', myq, u, 1)
redis.call('PEXPIRE', myq, ttl)
local cu = tonumber(redis.call('HGET', c, u) or '0')
if not backlogged[u] then
  local lo = nil
  for t, _ in pairs(backlogged) do
    local ct = tonumber(redis.call('HGET', c, t) or '0')
    if lo == nil or ct < lo then lo = ct end
  end
  if lo == nil then
    local who = redis.call('GET', last)
    lo = 0
    if who then lo = tonumber(redis.call('HGET', c, who) or '0') end
  end
  if lo > cu then
    cu = lo
    redis.call('HSET', c, u, string.format('%.17g', cu))
  end
end
return string.format('%.17g', cu)
"""
)

# KEYS: counters, routers, this router's queue, last; ARGV: router id, tenant, charge, now ms,
# ttl ms, queue key prefix. Leaves the backlog (admitted or gone) and charges the tenant;
# returns how many backlogged tenants (any router) stand below it, and its counter.
_DEQUEUE = (
    """
local c, routers, myq, last = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local rid, u, charge, now, ttl, prefix =
  ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
redis.call('ZREMRANGEBYSCORE', routers, '-inf', now)
redis.call('ZADD', routers, now + ttl, rid)
local left = redis.call('HINCRBY', myq, u, -1)
if left <= 0 then redis.call('HDEL', myq, u) end
redis.call('PEXPIRE', myq, ttl)
local cu = tonumber(redis.call('HINCRBYFLOAT', c, u, charge))
"""
    + _BACKLOGGED
    + """if not backlogged[u] then redis.call('SET', last, u) end
local below = 0
for t, _ in pairs(backlogged) do
  if t ~= u and tonumber(redis.call('HGET', c, t) or '0') < cu then below = below + 1 end
end
return {below, string.format('%.17g', cu)}
"""
)

ORDERS = ("vtc", "fcfs")


@dataclass(frozen=True, kw_only=True)
class FairnessConfig:
    """order: vtc or fcfs. weights: a tenant's share (default 1; a tenant of weight 2 is owed
    twice the service). priorities: a tenant's best engine priority (0 = first); a request may
    ask for a value in [0, priority_levels), never better than its tenant's."""

    order: str = "vtc"
    input_weight: float = 1.0
    output_weight: float = 2.0
    max_inflight: int = 64
    weights: Mapping[str, float] = field(default_factory=dict)
    priorities: Mapping[str, int] = field(default_factory=dict)
    priority_levels: int = 8
    lease_s: float = 30.0

    def weight(self, tenant: str) -> float:
        return self.weights.get(tenant, 1.0)


@dataclass(eq=False)
class _Waiter:
    tenant: str
    prompt_tokens: int
    seq: int
    fut: asyncio.Future = field(repr=False)


class Slot:
    """An admitted request: charges its tenant as its tokens are computed."""

    def __init__(self, vtc: VTC, tenant: str, priority: int) -> None:
        self._vtc = vtc
        self.tenant = tenant
        self.priority = priority  # the engine priority its standing earned (0 = first)

    def output(self, n: int) -> None:
        """n output tokens were generated."""
        if n > 0:
            self._vtc._charge(self.tenant, self._vtc.cfg.output_weight * n)

    def cached(self, n: int) -> None:
        """n prompt tokens charged at admission were prefix-cache hits: not computed."""
        if n > 0:
            self._vtc._charge(self.tenant, -self._vtc.cfg.input_weight * n)


class VTC:
    """One router replica's fair admission; shares its counters with the others through Redis.

    Make it inside the event loop that uses it; `close()` when done."""

    def __init__(
        self,
        redis_url: str,
        namespace: str,
        cfg: FairnessConfig,
        router_id: str | None = None,
        poll_s: float = 0.02,
    ) -> None:
        self.cfg = cfg
        self.router_id = router_id or uuid.uuid4().hex[:12]
        # Requests past the pool's connections wait for one rather than fail (a burst of
        # arrivals enqueues at once).
        pool = aredis.BlockingConnectionPool.from_url(redis_url, max_connections=32, timeout=30)
        self.r = aredis.Redis(connection_pool=pool)
        p = f"{namespace}:vtc:"
        self._qprefix = p + "q:"
        self._keys = [p + "c", p + "routers", self._qprefix + self.router_id, p + "last"]
        self._enqueue = self.r.register_script(_ENQUEUE)
        self._dequeue = self.r.register_script(_DEQUEUE)
        self._waiting: dict[str, deque[_Waiter]] = {}
        self._seq = itertools.count()
        self.inflight = 0
        self._poll_s = poll_s
        self._renewed = 0.0
        self._flush_lock = asyncio.Lock()
        self._woken: asyncio.Future = asyncio.get_running_loop().create_future()
        self._pending: dict[str, float] = {}  # charges not yet sent
        self._flushing: asyncio.Task | None = None
        self._pump_task = asyncio.get_running_loop().create_task(self._pump_loop())

    @property
    def num_waiting(self) -> int:
        return sum(len(q) for q in self._waiting.values())

    async def close(self) -> None:
        self._pump_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._pump_task
        if self._flushing is not None:
            await self._flushing
        await self.flush()
        await self.r.aclose()

    def _ttl_ms(self) -> int:
        return int(self.cfg.lease_s * 1000)

    async def counters(self) -> dict[str, float]:
        """Every tenant's counter (service / weight)."""
        await self.flush()
        raw = await self.r.hgetall(self._keys[0])
        return {k.decode(): float(v) for k, v in raw.items()}

    @contextlib.asynccontextmanager
    async def admit(self, tenant: str, prompt_tokens: int) -> AsyncIterator[Slot]:
        """Wait for this router's turn for the tenant's request; the slot is held inside."""
        await self.flush()  # the lift compares counters: this router's charges are in them
        now = int(time.time() * 1000)
        await self._enqueue(
            keys=self._keys,
            args=[self.router_id, tenant, now, self._ttl_ms(), self._qprefix],
        )
        fut = asyncio.get_running_loop().create_future()
        w = _Waiter(tenant, prompt_tokens, next(self._seq), fut)
        self._waiting.setdefault(tenant, deque()).append(w)
        self._wake()
        try:
            priority = await w.fut
        except asyncio.CancelledError:
            if w.fut.done() and not w.fut.cancelled():
                self._release()  # admitted as we were cancelled
            else:
                await asyncio.shield(self._leave(w))
            raise
        try:
            yield Slot(self, tenant, priority)
        finally:
            self._release()

    async def _leave(self, w: _Waiter) -> None:
        q = self._waiting.get(w.tenant)
        if q is not None and w in q:
            q.remove(w)
            await self._dequeue(
                keys=self._keys,
                args=[self.router_id, w.tenant, 0, int(time.time() * 1000), self._ttl_ms(),
                      self._qprefix],
            )  # fmt: skip

    def _wake(self) -> None:
        _resolve(self._woken)

    def _release(self) -> None:
        self.inflight -= 1
        self._wake()

    def _charge(self, tenant: str, amount: float) -> None:
        w = self.cfg.weight(tenant)
        self._pending[tenant] = self._pending.get(tenant, 0.0) + amount / w
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.get_running_loop().create_task(self._flush_logged())

    async def flush(self) -> None:
        """Send the charges gathered since the last flush (one pipeline). On failure they
        stay gathered for the next one. Returns once every charge made before the call is in."""
        async with self._flush_lock:
            if not self._pending:
                return
            batch, self._pending = self._pending, {}
            try:
                async with self.r.pipeline(transaction=False) as pipe:
                    for t, amount in batch.items():
                        pipe.hincrbyfloat(self._keys[0], t, amount)
                    await pipe.execute()
            except BaseException:
                for t, amount in batch.items():
                    self._pending[t] = self._pending.get(t, 0.0) + amount
                raise

    async def _flush_logged(self) -> None:
        try:
            await self.flush()
        except Exception as e:  # kept for the next flush (the pump flushes before ordering)
            log.warning("fair admission: charges not sent yet: %r", e)

    async def _pump_loop(self) -> None:
        """Admit while there is room and someone waits. Woken by arrivals and releases, and
        every poll_s while blocked (another replica's charges change the order)."""
        while True:
            loop = asyncio.get_running_loop()
            self._woken = woken = loop.create_future()
            timer = loop.call_later(self._poll_s, _resolve, woken)
            await woken
            timer.cancel()
            try:
                if time.monotonic() - self._renewed > self.cfg.lease_s / 3:
                    await self._renew()
                await self._pump()
            except Exception as e:  # Redis away: requests wait; retry on the next wake
                log.warning("fair admission: %r", e)
                await asyncio.sleep(self._poll_s)

    async def _renew(self) -> None:
        """Keep this router's lease (its waiting requests count as backlog while it lives)."""
        ttl = self._ttl_ms()
        async with self.r.pipeline(transaction=False) as pipe:
            pipe.zadd(self._keys[1], {self.router_id: int(time.time() * 1000) + ttl})
            pipe.pexpire(self._keys[2], ttl)
            await pipe.execute()
        self._renewed = time.monotonic()

    async def _pump(self) -> None:
        while self.inflight < self.cfg.max_inflight:
            heads = {t: q[0] for t, q in self._waiting.items() if q}
            heads = {t: w for t, w in heads.items() if not w.fut.done()}
            if not heads:
                return
            if self.cfg.order == "fcfs":
                w = min(heads.values(), key=lambda x: x.seq)
            else:
                await self.flush()
                names = sorted(heads)
                vals = await self.r.hmget(self._keys[0], names)
                c = {n: float(v or 0.0) for n, v in zip(names, vals, strict=True)}
                w = min(heads.values(), key=lambda x: (c[x.tenant], x.seq))
            self._waiting[w.tenant].popleft()
            self.inflight += 1
            below, _ = await self._dequeue(
                keys=self._keys,
                args=[
                    self.router_id, w.tenant,
                    repr(self.cfg.input_weight * w.prompt_tokens / self.cfg.weight(w.tenant)),
                    int(time.time() * 1000), self._ttl_ms(), self._qprefix,
                ],
            )  # fmt: skip
            if w.fut.done():  # cancelled meanwhile: its slot and its charge go back
                self.inflight -= 1
                self._charge(w.tenant, -self.cfg.input_weight * w.prompt_tokens)
                continue
            w.fut.set_result(min(int(below), self.cfg.priority_levels - 1))


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)
