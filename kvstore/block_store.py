"""A holder's blocks: memory and disk tiers with LRU demotion, pins with leases, lending limits.

Policy: a new block goes to memory; when memory is over budget the least recently used unpinned
block is demoted to disk, and when disk is over budget its least recently used unpinned block is
dropped. Reads refresh recency. Pinned blocks never move or drop until their lease ends.

Thread-safe (one lock); the gRPC servicer calls it from worker threads. Every change is reported
to an IndexSink in the order the index needs (see RedisIndex).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from kvstore.block import BlockError, BlockMeta, StoredBlock
from kvstore.leases import Leases
from kvstore.tiers import DiskTier, Entry, MemoryTier

MEMORY, DISK = "memory", "disk"


class IndexSink(Protocol):
    def added(self, entries: Sequence[tuple[BlockMeta, str]]) -> None: ...
    def moved(self, meta: BlockMeta, tier: str) -> None: ...
    def removing(self, metas: Sequence[BlockMeta]) -> None: ...


class NullSink:
    def added(self, entries: Sequence[tuple[BlockMeta, str]]) -> None:
        pass

    def moved(self, meta: BlockMeta, tier: str) -> None:
        pass

    def removing(self, metas: Sequence[BlockMeta]) -> None:
        pass


@dataclass(frozen=True)
class PutResult:
    block_id: bytes
    status: str  # "ok" | "present" | "no_space"
    tier: str | None = None
    message: str = ""


@dataclass(frozen=True)
class StoreStats:
    memory_capacity: int
    memory_used: int
    disk_capacity: int
    disk_used: int
    memory_blocks: int
    disk_blocks: int
    lent_bytes: int
    lend_capacity: int
    pinned_blocks: int
    demotions: int
    evictions: int
    gets: int
    puts: int


class BlockStore:
    def __init__(
        self,
        holder_id: str,
        memory_bytes: int,
        disk: tuple[Path, int] | None = None,
        shm_dir: Path | None = None,
        lend_fraction: float = 0.5,
        sink: IndexSink | None = None,
        clock=time.monotonic,
    ) -> None:
        self.holder_id = holder_id
        self.memory = MemoryTier(memory_bytes, shm_dir)
        self.disk = DiskTier(*disk) if disk else None
        self.lend_capacity = int(memory_bytes * lend_fraction)
        self.lent = 0
        self.sink: IndexSink = sink or NullSink()
        self._lock = threading.RLock()
        self._leases = Leases(clock)
        self.demotions = self.evictions = self.gets = self.puts = 0
        self.corrupt_dropped = 0

    def adopt_disk(self) -> None:
        """Announce blocks a previous run left on disk (call once the sink is connected)."""
        if self.disk is None:
            return
        with self._lock:
            found = self.disk.scan()
            self.sink.added([(m, DISK) for m in found])

    # -- writes -----------------------------------------------------------------------------

    def put_many(self, blocks: Sequence[StoredBlock]) -> list[PutResult]:
        results, landed = [], []
        with self._lock:
            self._leases.expire()
            for b in blocks:
                r = self._put_one(b)
                results.append(r)
                if r.status == "ok":
                    landed.append((b.meta, r.tier))
            # Stored first, indexed second: an index entry must never name a block that a
            # reader could not fetch from here.
            if landed:
                self.sink.added(landed)
        return results

    def _put_one(self, b: StoredBlock) -> PutResult:
        bid, size = b.block_id, b.meta.size
        tier = self.tier_of(bid)
        if tier is not None:
            self._touch(bid)
            return PutResult(bid, "present", tier)
        foreign = self._is_foreign(b.meta)
        if foreign and self.lent + size > self.lend_capacity:
            return PutResult(bid, "no_space", None, "lending cap reached on this holder")
        self.puts += 1
        if size <= self.memory.capacity and self._place_in_memory(b):
            tier = MEMORY
        elif self.disk is not None and self._make_room_on_disk(size):
            self.disk.add(b)
            tier = DISK
        else:
            return PutResult(bid, "no_space", None, "memory and disk are full of pinned blocks")
        if foreign:
            self.lent += size
        return PutResult(bid, "ok", tier)

    def _is_foreign(self, meta: BlockMeta) -> bool:
        return bool(meta.owner) and meta.owner != self.holder_id

    def _place_in_memory(self, b: StoredBlock) -> bool:
        m = self.memory
        if not self._make_room_in_memory(b.meta.size, exclude=b.block_id):
            return False
        while not m.add(b):  # the bytes fit but the arena is fragmented: free one more extent
            victim = next((k for k in m.entries if not self._leases.pinned(k)), None)
            if victim is None:
                return False
            self._demote(victim, m.entries[victim])
        return True

    def _make_room_in_memory(self, size: int, exclude: bytes) -> bool:
        m = self.memory
        if m.used + size <= m.capacity:
            return True
        victims, freed = [], 0
        for bid, e in m.entries.items():  # oldest first
            if m.used - freed + size <= m.capacity:
                break
            if self._leases.pinned(bid) or bid == exclude:
                continue
            victims.append((bid, e))
            freed += e.meta.size
        if m.used - freed + size > m.capacity:
            return False
        for bid, e in victims:
            self._demote(bid, e)
        return True

    def _demote(self, bid: bytes, e: Entry) -> None:
        if self.disk is not None and self._make_room_on_disk(e.meta.size):
            block = StoredBlock(e.meta, e.payload)
            self.disk.add(block)
            self.sink.moved(e.meta, DISK)  # both copies exist while the entry changes
            self.memory.remove(bid)
            self.demotions += 1
        else:
            self._drop(bid, MEMORY)

    def _make_room_on_disk(self, size: int) -> bool:
        d = self.disk
        assert d is not None
        if size > d.capacity:
            return False
        if d.used + size <= d.capacity:
            return True
        victims, freed = [], 0
        for bid, e in d.entries.items():
            if d.used - freed + size <= d.capacity:
                break
            if self._leases.pinned(bid):
                continue
            victims.append(bid)
            freed += e.meta.size
        if d.used - freed + size > d.capacity:
            return False
        for bid in victims:
            self._drop(bid, DISK)
        return True

    def _drop(self, bid: bytes, tier: str) -> None:
        t = self.memory if tier == MEMORY else self.disk
        assert t is not None
        meta = t.entries[bid].meta
        # Unindexed first, deleted second: a reader that found the entry a moment ago may still
        # ask for the block and gets a clean "missing" (it recomputes), never a dangling entry
        # that outlives the bytes for long.
        self.sink.removing([meta])
        t.remove(bid)
        if self._is_foreign(meta):
            self.lent -= meta.size
        self.evictions += 1

    def delete(self, ids: Iterable[bytes]) -> int:
        n = 0
        with self._lock:
            for bid in ids:
                tier = self.tier_of(bid)
                if tier is not None:
                    self._drop(bid, tier)
                    n += 1
        return n

    # -- reads ------------------------------------------------------------------------------

    def tier_of(self, bid: bytes) -> str | None:
        if bid in self.memory.entries:
            return MEMORY
        if self.disk is not None and bid in self.disk.entries:
            return DISK
        return None

    def lookup(self, ids: Sequence[bytes]) -> list[tuple[bytes, str, int]]:
        with self._lock:
            out = []
            for bid in ids:
                tier = self.tier_of(bid)
                if tier is not None:
                    t = self.memory if tier == MEMORY else self.disk
                    out.append((bid, tier, t.entries[bid].meta.size))  # type: ignore[union-attr]
            return out

    def get(self, bid: bytes) -> StoredBlock | None:
        """The block, or None if not held (or found corrupt on disk, which drops it)."""
        with self._lock:
            self.gets += 1
            e = self.memory.entries.get(bid)
            if e is not None:
                self.memory.entries.move_to_end(bid)
                return StoredBlock(e.meta, e.payload)
            if self.disk is None or bid not in self.disk.entries:
                return None
            self.disk.entries.move_to_end(bid)
            try:
                return self.disk.read(bid)
            except (OSError, BlockError):
                self.corrupt_dropped += 1
                self._drop(bid, DISK)
                return None

    def _touch(self, bid: bytes) -> None:
        if bid in self.memory.entries:
            self.memory.entries.move_to_end(bid)
        elif self.disk is not None and bid in self.disk.entries:
            self.disk.entries.move_to_end(bid)

    def held(self) -> list[tuple[BlockMeta, str]]:
        with self._lock:
            out = [(e.meta, MEMORY) for e in self.memory.entries.values()]
            if self.disk is not None:
                out += [(e.meta, DISK) for e in self.disk.entries.values()]
            return out

    def shm_location(self, bid: bytes) -> tuple[Path, int] | None:
        """(arena file, offset) of a memory-tier block when the arena is in shared memory."""
        e = self.memory.entries.get(bid)
        if e is None or self.memory.arena.path is None:
            return None
        return self.memory.arena.path, e.offset

    def close(self) -> None:
        with self._lock:
            self.memory.close()

    # -- pins -------------------------------------------------------------------------------

    def pin(
        self, ids: Sequence[bytes], lease_s: float, pin_id: str = ""
    ) -> tuple[str, list[bytes], list[bytes]]:
        """Pin the held ids for lease_s; the same pin_id extends an existing pin (and adds ids)."""
        with self._lock:
            self._leases.expire()
            pin_id = pin_id or uuid.uuid4().hex
            held = [b for b in ids if self.tier_of(b) is not None]
            missing = [b for b in ids if self.tier_of(b) is None]
            self._leases.hold(pin_id, held, lease_s)
            return pin_id, held, missing

    def unpin(self, pin_id: str) -> int:
        with self._lock:
            return self._leases.release(pin_id)

    def is_pinned(self, bid: bytes) -> bool:
        with self._lock:
            self._leases.expire()
            return self._leases.pinned(bid)

    # -- accounting -------------------------------------------------------------------------

    def stats(self) -> StoreStats:
        with self._lock:
            self._leases.expire()
            return StoreStats(
                memory_capacity=self.memory.capacity,
                memory_used=self.memory.used,
                disk_capacity=self.disk.capacity if self.disk else 0,
                disk_used=self.disk.used if self.disk else 0,
                memory_blocks=len(self.memory.entries),
                disk_blocks=len(self.disk.entries) if self.disk else 0,
                lent_bytes=self.lent,
                lend_capacity=self.lend_capacity,
                pinned_blocks=self._leases.num_pinned,
                demotions=self.demotions,
                evictions=self.evictions,
                gets=self.gets,
                puts=self.puts,
            )
