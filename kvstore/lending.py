"""The KV lending ledger in Redis: who lends engine KV blocks, how many, to whom.

Creditors (attention replicas) lend paged KV blocks to borrowers (decode replicas whose own
pool is short). Each creditor is the only writer of its own entries, and updates them in the
same breath as it allocates or frees blocks; borrowers read the ledger to find creditors with
spare blocks of their KV layout. Counted in blocks. Key schema (NS defaults to "splitserve"):

  NS:lend:creditors          SET  creditor ids announced (dead ones pruned by readers)
  NS:lend:creditor:<id>      HASH address, host_id, layout, capacity, lend_cap, lent; TTL = liveness
  NS:lend:debt:<id>          HASH borrower id -> blocks it owes creditor <id>; same TTL

A creditor's heartbeat renews both TTLs; a dead creditor's entries expire with it (what it lent
is gone: the borrowers recompute). A heartbeat that finds the entry gone (Redis restarted or
flushed) restores it from the creditor's own state.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

# lent + n <= lend_cap, atomically, or nothing changes. KEYS: creditor, debt. ARGV: borrower,
# n, ttl ms.
_LEND = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local cap = tonumber(redis.call('HGET', KEYS[1], 'lend_cap') or '0')
local lent = tonumber(redis.call('HGET', KEYS[1], 'lent') or '0')
local n = tonumber(ARGV[2])
if lent + n > cap then return 0 end
redis.call('HINCRBY', KEYS[1], 'lent', n)
redis.call('HINCRBY', KEYS[2], ARGV[1], n)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return 1
"""

# Take min(n, owed) off the borrower's debt and the creditor's lent; n < 0 takes all it owes.
_REPAY = """
local owed = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
local n = tonumber(ARGV[2])
if n < 0 or n > owed then n = owed end
if n <= 0 then return 0 end
if owed - n == 0 then
  redis.call('HDEL', KEYS[2], ARGV[1])
else
  redis.call('HINCRBY', KEYS[2], ARGV[1], -n)
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  local lent = tonumber(redis.call('HGET', KEYS[1], 'lent') or '0')
  redis.call('HSET', KEYS[1], 'lent', math.max(0, lent - n))
end
return n
"""


@dataclass(frozen=True)
class CreditorInfo:
    creditor_id: str
    address: str
    host_id: str
    layout: str  # what borrower and creditor KV must share (model, dtype, block shape)
    capacity: int  # blocks in its pool
    lend_cap: int  # most blocks it lends in total
    lent: int = 0

    @property
    def spare(self) -> int:
        return max(0, min(self.lend_cap, self.capacity) - self.lent)


class Ledger:
    def __init__(self, redis_url: str, namespace: str = "splitserve", ttl_s: float = 10.0) -> None:
        self.r = redis.Redis.from_url(
            redis_url, socket_timeout=2.0, socket_connect_timeout=2.0, decode_responses=True
        )
        self.ns = namespace
        self.ttl_ms = int(ttl_s * 1000)
        self._lend = self.r.register_script(_LEND)
        self._repay = self.r.register_script(_REPAY)

    def _creditor(self, cid: str) -> str:
        return f"{self.ns}:lend:creditor:{cid}"

    def _debt(self, cid: str) -> str:
        return f"{self.ns}:lend:debt:{cid}"

    @property
    def _set(self) -> str:
        return f"{self.ns}:lend:creditors"

    # -- the creditor's side ------------------------------------------------------------------

    def announce(self, info: CreditorInfo) -> None:
        self.restore(info, None)

    def restore(self, info: CreditorInfo, debts: dict[str, int] | None) -> None:
        """Write the creditor's entry (and, if given, replace its debts) in one transaction."""
        _check_id(info.creditor_id)
        p = self.r.pipeline(transaction=True)
        key = self._creditor(info.creditor_id)
        p.hset(key, mapping={
            "address": info.address, "host_id": info.host_id, "layout": info.layout,
            "capacity": info.capacity, "lend_cap": info.lend_cap, "lent": info.lent,
        })  # fmt: skip
        p.pexpire(key, self.ttl_ms)
        p.sadd(self._set, info.creditor_id)
        if debts is not None:
            p.delete(self._debt(info.creditor_id))
            owed = {b: n for b, n in debts.items() if n > 0}
            if owed:
                p.hset(self._debt(info.creditor_id), mapping=owed)
                p.pexpire(self._debt(info.creditor_id), self.ttl_ms)
        p.execute()

    def heartbeat(self, creditor_id: str) -> bool:
        """Renew the entry's TTL; False if it is gone (the caller restores it)."""
        p = self.r.pipeline(transaction=False)
        p.pexpire(self._creditor(creditor_id), self.ttl_ms)
        p.pexpire(self._debt(creditor_id), self.ttl_ms)
        alive, _ = p.execute()
        return bool(alive)

    def try_lend(self, creditor_id: str, borrower_id: str, n: int) -> bool:
        _check_id(creditor_id)
        _check_id(borrower_id)
        _check_n(n)
        keys = [self._creditor(creditor_id), self._debt(creditor_id)]
        return bool(self._lend(keys=keys, args=[borrower_id, n, self.ttl_ms]))

    def repay(self, creditor_id: str, borrower_id: str, n: int) -> int:
        _check_n(n)
        keys = [self._creditor(creditor_id), self._debt(creditor_id)]
        return int(self._repay(keys=keys, args=[borrower_id, n]))

    def repay_all(self, creditor_id: str, borrower_id: str) -> int:
        keys = [self._creditor(creditor_id), self._debt(creditor_id)]
        return int(self._repay(keys=keys, args=[borrower_id, -1]))

    def set_lend_cap(self, creditor_id: str, n: int) -> None:
        if n < 0:
            raise ValueError(f"lend cap must be >= 0, got {n}")
        self.r.hset(self._creditor(creditor_id), "lend_cap", n)

    def withdraw(self, creditor_id: str) -> None:
        p = self.r.pipeline(transaction=True)
        p.delete(self._creditor(creditor_id), self._debt(creditor_id))
        p.srem(self._set, creditor_id)
        p.execute()

    # -- readers ------------------------------------------------------------------------------

    def creditors(self, layout: str | None = None) -> list[CreditorInfo]:
        """Live creditors (of this layout), most spare blocks first."""
        ids = sorted(self.r.smembers(self._set))
        if not ids:
            return []
        p = self.r.pipeline(transaction=False)
        for cid in ids:
            p.hgetall(self._creditor(cid))
        out, dead = [], []
        for cid, h in zip(ids, p.execute(), strict=True):
            if not h:
                dead.append(cid)
                continue
            info = CreditorInfo(
                cid, h.get("address", ""), h.get("host_id", ""), h.get("layout", ""),
                int(h.get("capacity", 0)), int(h.get("lend_cap", 0)), int(h.get("lent", 0)),
            )  # fmt: skip
            if layout is None or info.layout == layout:
                out.append(info)
        if dead:
            self.r.srem(self._set, *dead)
        return sorted(out, key=lambda c: (-c.spare, c.creditor_id))

    def debts(self) -> dict[str, dict[str, int]]:
        """Who owes whom: creditor -> {borrower -> blocks}, live creditors only."""
        live = [c.creditor_id for c in self.creditors()]
        p = self.r.pipeline(transaction=False)
        for cid in live:
            p.hgetall(self._debt(cid))
        return {
            cid: {b: int(n) for b, n in h.items()}
            for cid, h in zip(live, p.execute() if live else [], strict=True)
        }

    def close(self) -> None:
        self.r.close()


def _check_id(v: str) -> None:
    if not v:
        raise ValueError("an id must be non-empty")


def _check_n(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"a block count must be a positive integer, got {n!r}")
