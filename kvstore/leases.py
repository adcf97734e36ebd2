"""Pins with leases over block ids: a reader or a hand-off holds blocks off eviction under a pin
id until it releases the pin or the lease ends (which covers a reader that never says so)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence


class Leases:
    """Named pins; a block is pinned while any live pin holds it. Not locked: its owner (a
    BlockStore, a DevicePool) calls it under its own lock."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._pins: dict[str, tuple[float, tuple[bytes, ...]]] = {}  # id -> (end, block ids)
        self._count: Counter[bytes] = Counter()

    def hold(self, pin_id: str, ids: Sequence[bytes], lease_s: float) -> None:
        """Pin ids under pin_id for lease_s from now; the same pin_id extends that pin (its
        lease restarts and it gains the new ids)."""
        prev = self._pins.get(pin_id, (0.0, ()))[1]
        seen = set(prev)
        new = [b for b in dict.fromkeys(ids) if b not in seen]
        self._count.update(new)
        self._pins[pin_id] = (self.clock() + lease_s, (*prev, *new))

    def release(self, pin_id: str) -> int:
        """End a pin; returns how many blocks it held (0 for an unknown or ended pin)."""
        entry = self._pins.pop(pin_id, None)
        if entry is None:
            return 0
        for b in entry[1]:
            self._count[b] -= 1
            if self._count[b] <= 0:
                del self._count[b]
        return len(entry[1])

    def expire(self) -> None:
        now = self.clock()
        for pid in [p for p, (end, _) in self._pins.items() if end <= now]:
            self.release(pid)

    def pinned(self, bid: bytes) -> bool:
        return self._count.get(bid, 0) > 0

    @property
    def num_pins(self) -> int:
        return len(self._pins)

    @property
    def num_pinned(self) -> int:
        """Blocks held by at least one pin."""
        return len(self._count)
