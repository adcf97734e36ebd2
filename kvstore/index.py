"""The Redis index of the KV store: where each block lives, who holds what, how much room is left.

Redis holds only this metadata, never block bytes. Key schema (NS defaults to "splitserve"; the
same table is in docs/architecture.md):

  NS:kv:block:<id hex>            HASH holder_id -> "<tier>:<bytes>"   (tier: m = memory, d = disk)
  NS:kv:holders                   SET  holder ids ever registered (pruned by the janitor)
  NS:kv:holder:<holder_id>        HASH address, host_id, shm_dir, mem_capacity, mem_used,
                                       disk_capacity, disk_used, lend_capacity, lent; TTL = liveness
  NS:kv:holder:<holder_id>:blocks SET  id hex of every block the holder has indexed
  NS:kv:holder:<holder_id>:resv   HASH reservation id -> "<bytes>:<expiry ms>" (lending)

A holder's key expires unless its heartbeat renews it: a dead holder vanishes and readers skip it;
any live holder's janitor later deletes the dead one's block entries. A heartbeat that finds its
own key gone (Redis flushed or restarted) re-announces everything it holds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import redis
import redis.asyncio as aredis

from kvstore.block import BlockMeta

log = logging.getLogger(__name__)

TIER_CODES = {"memory": "m", "disk": "d"}
CODE_TIERS = {v: k for k, v in TIER_CODES.items()}


@dataclass(frozen=True)
class Keys:
    ns: str = "splitserve"

    def block(self, hex_id: str) -> str:
        return f"{self.ns}:kv:block:{hex_id}"

    @property
    def holders(self) -> str:
        return f"{self.ns}:kv:holders"

    def holder(self, hid: str) -> str:
        return f"{self.ns}:kv:holder:{hid}"

    def holder_blocks(self, hid: str) -> str:
        return f"{self.ns}:kv:holder:{hid}:blocks"

    def reservations(self, hid: str) -> str:
        return f"{self.ns}:kv:holder:{hid}:resv"


@dataclass(frozen=True)
class HolderInfo:
    holder_id: str
    address: str
    host_id: str
    shm_dir: str
    mem_capacity: int
    mem_used: int
    disk_capacity: int
    disk_used: int
    lend_capacity: int
    lent: int

    @property
    def mem_free(self) -> int:
        return max(0, self.mem_capacity - self.mem_used)

    @classmethod
    def from_hash(cls, hid: str, h: dict) -> HolderInfo:
        g = {_s(k): _s(v) for k, v in h.items()}
        ints = ("mem_capacity", "mem_used", "disk_capacity", "disk_used", "lend_capacity", "lent")
        return cls(
            holder_id=hid,
            address=g.get("address", ""),
            host_id=g.get("host_id", ""),
            shm_dir=g.get("shm_dir", ""),
            **{k: int(g.get(k, 0) or 0) for k in ints},
        )


def _s(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _entry(meta: BlockMeta, tier: str) -> str:
    return f"{TIER_CODES[tier]}:{meta.size}"


# Drop a dead holder's block entries; atomic so two janitors never interleave.
_CLEANUP = """
if redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
local ids = redis.call('SMEMBERS', KEYS[2])
for _, h in ipairs(ids) do redis.call('HDEL', ARGV[1] .. h, ARGV[2]) end
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('SREM', KEYS[4], ARGV[2])
return #ids
"""

# Reserve-then-write: admit a lending placement only if the holder's free memory and its lending
# cap, less every live reservation, still cover it. Expired reservations are purged on the way.
_RESERVE = """
local h = redis.call('HMGET', KEYS[1], 'mem_capacity', 'mem_used', 'lend_capacity', 'lent')
if not h[1] then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local reserved = 0
local all = redis.call('HGETALL', KEYS[2])
for i = 1, #all, 2 do
  local v = all[i + 1]
  local sep = string.find(v, ':', 1, true)
  local b = tonumber(string.sub(v, 1, sep - 1))
  if tonumber(string.sub(v, sep + 1)) <= now then
    redis.call('HDEL', KEYS[2], all[i])
  else
    reserved = reserved + b
  end
end
local need = tonumber(ARGV[2])
local free = tonumber(h[1]) - tonumber(h[2]) - reserved
local lend_free = tonumber(h[3]) - tonumber(h[4]) - reserved
if free < need or lend_free < need then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2] .. ':' .. (now + tonumber(ARGV[3])))
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[3]) * 4)
return 1
"""


# A batch of new entries in one call (a pipeline of one HSET per block costs the client more to
# pack and parse than the whole write costs Redis). KEYS: the n entries' keys, the holder's
# block set, its registration hash. ARGV: holder id, n entries, n id hexes, capacity fields.
_ADD = """
local n = #KEYS - 2
for i = 1, n do
  redis.call('HSET', KEYS[i], ARGV[1], ARGV[i + 1])
  redis.call('SADD', KEYS[n + 1], ARGV[n + i + 1])
end
if #ARGV > 2 * n + 1 then redis.call('HSET', KEYS[n + 2], unpack(ARGV, 2 * n + 2)) end
return n
"""

# Every id's entry in one call. The ids travel as one argument (ARGV[2], comma-separated hex)
# rather than one key each: the client's cost to pack a command grows with its arguments, and
# with a thousand ids that was most of a get's time. ARGV[1]: the entries' key prefix.
_LOCATE = """
local out = {}
for hx in string.gmatch(ARGV[2], '[^,]+') do
  out[#out + 1] = redis.call('HGETALL', ARGV[1] .. hx)
end
return out
"""


class RedisIndex:
    """A holder's side of the index (synchronous: the block store calls it under its lock).

    Redis being unreachable never fails a put or a get: the change is skipped, the index is
    marked dirty, and the next heartbeat that reaches Redis re-announces everything.
    """

    def __init__(
        self,
        url: str,
        holder_id: str,
        info: dict[str, str],
        held: Callable[[], list[tuple[BlockMeta, str]]],
        capacity: Callable[[], dict[str, int]],
        ns: str = "splitserve",
        ttl_s: float = 5.0,
    ) -> None:
        self.r = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        self.k = Keys(ns)
        self.holder_id = holder_id
        self.info = info
        self.held = held
        self.capacity = capacity
        self.ttl_ms = int(ttl_s * 1000)
        self.dirty = True
        self.reannounces = 0
        self._lock = threading.Lock()
        self._add = self.r.register_script(_ADD)

    # -- IndexSink -------------------------------------------------------------------------

    def added(self, entries: Sequence[tuple[BlockMeta, str]]) -> None:
        if not entries:
            return
        hexes = [m.hex for m, _ in entries]
        keys = [self.k.block(hx) for hx in hexes]
        keys += [self.k.holder_blocks(self.holder_id), self.k.holder(self.holder_id)]
        args = [self.holder_id, *(_entry(m, t) for m, t in entries), *hexes]

        def write():
            capacity = [x for kv in self.capacity().items() for x in kv]
            self._add(keys=keys, args=args + capacity)

        self._write(write)

    def moved(self, meta: BlockMeta, tier: str) -> None:
        self._write(lambda: self.r.hset(self.k.block(meta.hex), self.holder_id, _entry(meta, tier)))

    def removing(self, metas: Sequence[BlockMeta]) -> None:
        def write():
            p = self.r.pipeline(transaction=False)
            for m in metas:
                p.hdel(self.k.block(m.hex), self.holder_id)
            p.srem(self.k.holder_blocks(self.holder_id), *[m.hex for m in metas])
            p.execute()

        self._write(write)

    def release_reservations(self, ids: Sequence[str]) -> None:
        if ids:
            self._write(lambda: self.r.hdel(self.k.reservations(self.holder_id), *ids))

    def _write(self, write: Callable[[], object]) -> None:
        """One round trip to Redis; a failure marks the index for re-announcing."""
        if self.dirty:
            return  # the next heartbeat rewrites everything anyway
        try:
            write()
        except redis.RedisError as e:
            log.warning("index write failed (%s); will re-announce", e)
            self.dirty = True

    # -- liveness --------------------------------------------------------------------------

    def heartbeat(self) -> bool:
        """Renew this holder's registration; re-announce if it was lost. True if Redis answered."""
        with self._lock:
            try:
                if not self.dirty:
                    p = self.r.pipeline(transaction=False)
                    p.pexpire(self.k.holder(self.holder_id), self.ttl_ms)
                    p.hset(self.k.holder(self.holder_id), mapping=self.capacity())
                    alive, _ = p.execute()
                    if alive:
                        return True
                self.reannounce()
                return True
            except redis.RedisError as e:
                log.warning("heartbeat failed: %s", e)
                self.dirty = True
                return False

    def reannounce(self) -> None:
        """Write this holder's registration and every entry it holds; drop entries it no longer
        holds (left from before a restart of Redis with persistence)."""
        held = self.held()
        hkey, bkey = self.k.holder(self.holder_id), self.k.holder_blocks(self.holder_id)
        old = {_s(x) for x in self.r.smembers(bkey)}
        now = {m.hex for m, _ in held}
        p = self.r.pipeline(transaction=False)
        p.hset(hkey, mapping={**self.info, **self.capacity()})
        p.pexpire(hkey, self.ttl_ms)
        p.sadd(self.k.holders, self.holder_id)
        for hx in old - now:
            p.hdel(self.k.block(hx), self.holder_id)
            p.srem(bkey, hx)
        for i, (meta, tier) in enumerate(held):
            p.hset(self.k.block(meta.hex), self.holder_id, _entry(meta, tier))
            if i % 1000 == 999:
                p.execute()
                p = self.r.pipeline(transaction=False)
        if now:
            p.sadd(bkey, *now)
        p.execute()
        self.dirty = False
        self.reannounces += 1

    def janitor(self) -> int:
        """Remove the entries of holders whose registration expired. Returns entries removed."""
        removed = 0
        try:
            cleanup = self.r.register_script(_CLEANUP)
            for raw in self.r.smembers(self.k.holders):
                hid = _s(raw)
                if hid == self.holder_id:
                    continue
                n = cleanup(
                    keys=[
                        self.k.holder(hid),
                        self.k.holder_blocks(hid),
                        self.k.reservations(hid),
                        self.k.holders,
                    ],
                    args=[self.k.block(""), hid],
                )
                removed += max(0, int(n))
        except redis.RedisError as e:
            log.warning("janitor failed: %s", e)
        return removed

    def deregister(self) -> None:
        """Leave cleanly: entries first, then the registration."""
        try:
            held = self.held()
            p = self.r.pipeline(transaction=False)
            for meta, _ in held:
                p.hdel(self.k.block(meta.hex), self.holder_id)
            p.delete(
                self.k.holder_blocks(self.holder_id),
                self.k.holder(self.holder_id),
                self.k.reservations(self.holder_id),
            )
            p.srem(self.k.holders, self.holder_id)
            p.execute()
        except redis.RedisError as e:
            log.warning("deregister failed: %s", e)
        finally:
            self.r.close()


class IndexReader:
    """The client's side of the index (asyncio)."""

    def __init__(self, url: str, ns: str = "splitserve", holders_ttl_s: float = 0.5) -> None:
        self.r = aredis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        self.k = Keys(ns)
        self.holders_ttl_s = holders_ttl_s
        self._holders: dict[str, HolderInfo] = {}
        self._holders_at = -1e9
        self._reserve = self.r.register_script(_RESERVE)
        self._locate = self.r.register_script(_LOCATE)

    async def close(self) -> None:
        await self.r.aclose()

    async def live_holders(self, refresh: bool = False) -> dict[str, HolderInfo]:
        now = time.monotonic()
        if refresh or now - self._holders_at > self.holders_ttl_s:
            ids = sorted(_s(x) for x in await self.r.smembers(self.k.holders))
            p = self.r.pipeline(transaction=False)
            for hid in ids:
                p.hgetall(self.k.holder(hid))
            hashes = await p.execute() if ids else []
            self._holders = {
                hid: HolderInfo.from_hash(hid, h)
                for hid, h in zip(ids, hashes, strict=True)
                if h and h.get(b"address")
            }
            self._holders_at = now
        return self._holders

    async def locate(self, hex_ids: Sequence[str]) -> list[dict[str, tuple[str, int]]]:
        """For each id: holder_id -> (tier, size), live holders only. One script call rather
        than a pipeline of HGETALLs: the client packs and parses one command, not one per id.
        (Keys named inside the script: fine on one Redis; a Redis Cluster would need hash tags.)"""
        live = await self.live_holders()
        if not hex_ids:
            return []
        flat = await self._locate(args=[self.k.block(""), ",".join(hex_ids)])
        names: dict[bytes, str] = {}  # a few holders answer for thousands of ids
        out = []
        for pairs in flat:
            entry = {}
            for i in range(0, len(pairs), 2):
                raw = pairs[i]
                hid = names.get(raw) or names.setdefault(raw, _s(raw))
                if hid in live:
                    code, _, size = _s(pairs[i + 1]).partition(":")
                    entry[hid] = (CODE_TIERS.get(code, "memory"), int(size))
            out.append(entry)
        return out

    async def reserve(self, holder_id: str, nbytes: int, resv_id: str, ttl_ms: int) -> bool:
        keys = [self.k.holder(holder_id), self.k.reservations(holder_id)]
        return bool(await self._reserve(keys=keys, args=[resv_id, nbytes, ttl_ms]))
