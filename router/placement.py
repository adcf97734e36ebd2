"""Where a request goes: pure decisions over replica load and prefix holdings.

Prefill: the replica whose KV shard holds the longest prefix of the prompt's blocks saves that
much compute; among those within `near` blocks of the best, the one with the fewest outstanding
prefill tokens wins (a warm cache is worth little behind a long queue). Decode: the least loaded
replica by running sequences and free KV blocks, preferring one that served this prefix recently
(its prefix cache likely still holds it, so fewer blocks move).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    replica_id: str
    address: str
    running: int = 0
    waiting: int = 0
    free_blocks: int = 0
    total_blocks: int = 1
    outstanding_tokens: int = 0  # prefill: prompt tokens sent and not yet answered
    prefix_blocks: int = 0  # leading prompt blocks this replica holds


def pick_prefill(cands: Sequence[Candidate], near: int = 1) -> Candidate:
    best = max(c.prefix_blocks for c in cands)
    close = [c for c in cands if c.prefix_blocks >= best - near]
    return min(close, key=lambda c: (c.outstanding_tokens, -c.prefix_blocks, c.replica_id))


def decode_load(c: Candidate) -> float:
    """Occupancy in [0, ~2]: share of KV blocks in use plus queue pressure."""
    used = 1.0 - c.free_blocks / max(1, c.total_blocks)
    return used + (c.running + 2 * c.waiting) / max(1, c.total_blocks)


def pick_decode(
    cands: Sequence[Candidate], preferred: str | None, slack: float = 0.15
) -> Candidate:
    least = min(cands, key=lambda c: (decode_load(c), c.replica_id))
    if preferred is not None:
        pref = next((c for c in cands if c.replica_id == preferred), None)
        if pref is not None and decode_load(pref) <= decode_load(least) + slack:
            return pref
    return least


class PrefixAffinity:
    """Which decode replica last served a prefix (by its first block ids), LRU-bounded."""

    def __init__(self, capacity: int = 65536) -> None:
        self.capacity = capacity
        self._map: OrderedDict[bytes, str] = OrderedDict()

    def lookup(self, block_ids: Sequence[bytes]) -> str | None:
        for bid in reversed(block_ids):  # the longest known prefix wins
            rid = self._map.get(bid)
            if rid is not None:
                self._map.move_to_end(bid)
                return rid
        return None

    def record(self, block_ids: Sequence[bytes], replica_id: str) -> None:
        for bid in block_ids:
            self._map[bid] = replica_id
            self._map.move_to_end(bid)
        while len(self._map) > self.capacity:
            self._map.popitem(last=False)
