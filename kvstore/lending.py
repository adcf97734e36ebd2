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
flushed) returns False and the creditor restores it, debts included, from its own state.

Every update that reads before it writes is one Lua script, so two threads (or a reader's prune
and a creditor's restore) never interleave. A Redis Cluster would need the keys hash-tagged.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

# lent + n <= lend_cap, atomically, or nothing changes. KEYS: creditor, debt. ARGV: borrower,
# n, ttl ms.
_LEND = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local cap = tonumber(redis.call('HGET', KEYS[1], 'lend_cap') or '0')
local capacity = tonumber(redis.call('HGET', KEYS[1], 'capacity') or '0')
if capacity < cap then cap = capacity end
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
# KEYS: creditor, debt. ARGV: borrower, n.
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

# Renew both TTLs if the entry is there. The SADD puts back a SET member a reader may have
# pruned while the entry was briefly gone, so a live creditor is never left out of the SET.
# KEYS: creditor, debt, set. ARGV: creditor id, ttl ms.
_HEARTBEAT = """
if redis.call('PEXPIRE', KEYS[1], ARGV[2]) == 0 then return 0 end
redis.call('PEXPIRE', KEYS[2], ARGV[2])
redis.call('SADD', KEYS[3], ARGV[1])
return 1
"""

# Only on a live entry: an HSET on an expired key would make an entry with no TTL and no address.
# KEYS: creditor. ARGV: cap.
_SET_CAP = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'lend_cap', ARGV[1])
return 1
"""

# Drop the ids whose entry is gone, checked here rather than from an earlier read: a creditor
# restoring itself between a reader's read and its SREM must keep its member. KEYS: set.
# ARGV: the creditor key prefix, then the ids.
_PRUNE = """
local n = 0
for i = 2, #ARGV do
  if redis.call('EXISTS', ARGV[1] .. ARGV[i]) == 0 then
    n = n + redis.call('SREM', KEYS[1], ARGV[i])
  end
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
    """One process's view of the ledger; one client (a connection pool, so two threads may
    share a Ledger). Creditors write only their own entries; anyone reads."""

    def __init__(self, redis_url: str, namespace: str = "splitserve", ttl_s: float = 10.0) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        # Short timeouts: a creditor calls this while lending; a stalled Redis must not stall it.
        self.r = redis.Redis.from_url(
            redis_url, socket_timeout=2.0, socket_connect_timeout=2.0, decode_responses=True
        )
        self.ns = namespace
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self._lend = self.r.register_script(_LEND)
        self._repay = self.r.register_script(_REPAY)
        self._heartbeat = self.r.register_script(_HEARTBEAT)
        self._set_cap = self.r.register_script(_SET_CAP)
        self._prune = self.r.register_script(_PRUNE)

    def _creditor(self, cid: str) -> str:
        return f"{self.ns}:lend:creditor:{cid}"

    def _debt(self, cid: str) -> str:
        return f"{self.ns}:lend:debt:{cid}"

    @property
    def _set(self) -> str:
        return f"{self.ns}:lend:creditors"

    # -- the creditor's side ------------------------------------------------------------------

    def announce(self, info: CreditorInfo) -> None:
        """Write the creditor's entry; `info.lent` is the creditor's own count (it is the
        authority). Its debts are kept, their TTL renewed."""
        self.restore(info, None)

    def restore(self, info: CreditorInfo, debts: dict[str, int] | None) -> None:
        """Write the creditor's entry and, if given, replace its debts, in one transaction
        (a reader never sees the entry without its debts)."""
        _check_info(info)
        owed = {}
        for b, n in (debts or {}).items():
            _check_id(b, "borrower id")
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(f"blocks owed by {b!r} must be an integer >= 0, got {n!r}")
            if n:
                owed[b] = n
        key, debt = self._creditor(info.creditor_id), self._debt(info.creditor_id)
        p = self.r.pipeline(transaction=True)
        p.hset(key, mapping={
            "address": info.address, "host_id": info.host_id, "layout": info.layout,
            "capacity": info.capacity, "lend_cap": info.lend_cap, "lent": info.lent,
        })  # fmt: skip
        p.pexpire(key, self.ttl_ms)
        p.sadd(self._set, info.creditor_id)
        if debts is not None:
            p.delete(debt)
            if owed:
                p.hset(debt, mapping=owed)
        p.pexpire(debt, self.ttl_ms)  # no-op when it has no debts (no key)
        p.execute()

    def heartbeat(self, creditor_id: str) -> bool:
        """Renew the entry's TTLs; False if it is gone (the caller restores it)."""
        _check_id(creditor_id)
        keys = [self._creditor(creditor_id), self._debt(creditor_id), self._set]
        return bool(self._heartbeat(keys=keys, args=[creditor_id, self.ttl_ms]))

    def try_lend(self, creditor_id: str, borrower_id: str, n: int) -> bool:
        """Record n more blocks lent to the borrower if the lend cap allows; else change
        nothing and return False (also when the creditor's entry is gone)."""
        _check_id(creditor_id)
        _check_id(borrower_id, "borrower id")
        _check_n(n)
        keys = [self._creditor(creditor_id), self._debt(creditor_id)]
        return bool(self._lend(keys=keys, args=[borrower_id, n, self.ttl_ms]))

    def repay(self, creditor_id: str, borrower_id: str, n: int) -> int:
        """Take up to n blocks off what the borrower owes (never below zero); returns how many."""
        _check_id(creditor_id)
        _check_id(borrower_id, "borrower id")
        _check_n(n)
        keys = [self._creditor(creditor_id), self._debt(creditor_id)]
        return int(self._repay(keys=keys, args=[borrower_id, n]))

    def repay_all(self, creditor_id: str, borrower_id: str) -> int:
        """Clear what the borrower owes; returns how many blocks that was."""
        _check_id(creditor_id)
        _check_id(borrower_id, "borrower id")
        keys = [self._creditor(creditor_id), self._debt(creditor_id)]
        return int(self._repay(keys=keys, args=[borrower_id, -1]))

    def set_lend_cap(self, creditor_id: str, n: int) -> None:
        """A new lend cap (below `lent` is allowed: it lends no more until repaid). Nothing
        happens if the entry is gone: the next restore writes the creditor's cap."""
        _check_id(creditor_id)
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"lend cap must be an integer >= 0, got {n!r}")
        self._set_cap(keys=[self._creditor(creditor_id)], args=[n])

    def withdraw(self, creditor_id: str) -> None:
        _check_id(creditor_id)
        p = self.r.pipeline(transaction=True)
        p.delete(self._creditor(creditor_id), self._debt(creditor_id))
        p.srem(self._set, creditor_id)
        p.execute()

    # -- readers ------------------------------------------------------------------------------

    def creditors(self, layout: str | None = None) -> list[CreditorInfo]:
        """Live creditors (of this layout), most spare blocks first, then by id."""
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
                *(int(h.get(k) or 0) for k in ("capacity", "lend_cap", "lent")),
            )  # fmt: skip
            if layout is None or info.layout == layout:
                out.append(info)
        if dead:
            self._prune(keys=[self._set], args=[self._creditor(""), *dead])
        return sorted(out, key=lambda c: (-c.spare, c.creditor_id))

    def debts(self) -> dict[str, dict[str, int]]:
        """Who owes whom: creditor -> {borrower -> blocks}, live creditors only (one with
        nothing lent maps to {})."""
        live = [c.creditor_id for c in self.creditors()]
        if not live:
            return {}
        p = self.r.pipeline(transaction=False)
        for cid in live:
            p.hgetall(self._debt(cid))
        return {
            cid: {b: int(n) for b, n in sorted(h.items())}
            for cid, h in zip(live, p.execute(), strict=True)
        }

    def close(self) -> None:
        self.r.close()


def _check_id(v: str, what: str = "creditor id") -> None:
    if not isinstance(v, str) or not v:
        raise ValueError(f"a {what} must be a non-empty string, got {v!r}")


def _check_n(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"a block count must be a positive integer, got {n!r}")


def _check_info(info: CreditorInfo) -> None:
    _check_id(info.creditor_id)
    for k in ("capacity", "lend_cap", "lent"):
        v = getattr(info, k)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"CreditorInfo.{k} must be an integer >= 0, got {v!r}")
