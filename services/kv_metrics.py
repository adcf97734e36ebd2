"""Prometheus view of a prefill replica's KV shard: bytes and blocks per tier, capacity, pins,
demotions and evictions (`splitserve:kv_store_*`, docs/metrics.md)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from kvstore.block_store import StoreStats


class StoreCollector(Collector):
    """Read on the scrape thread: `stats` returns a fresh StoreStats (taken under the store's
    lock), so a scrape never sees a half-updated store."""

    def __init__(self, role: str, model: str, stats: Callable[[], StoreStats]) -> None:
        self.labels = [role, model]
        self.stats = stats

    def _by_tier(self, name: str, doc: str, memory: int, disk: int) -> GaugeMetricFamily:
        g = GaugeMetricFamily(name, doc, labels=("role", "model", "tier"))
        g.add_metric([*self.labels, "memory"], memory)
        g.add_metric([*self.labels, "disk"], disk)
        return g

    def collect(self):
        s = self.stats()
        yield self._by_tier(
            "splitserve:kv_store_used_bytes", "KV bytes held by the shard, by tier.",
            s.memory_used, s.disk_used,
        )  # fmt: skip
        yield self._by_tier(
            "splitserve:kv_store_capacity_bytes",
            "The shard's capacity by tier (disk: 0 when it has no disk tier).",
            s.memory_capacity, s.disk_capacity,
        )  # fmt: skip
        yield self._by_tier(
            "splitserve:kv_store_blocks", "KV blocks held by the shard, by tier.",
            s.memory_blocks, s.disk_blocks,
        )  # fmt: skip
        g = GaugeMetricFamily(
            "splitserve:kv_store_pinned_blocks",
            "Blocks pinned until a decoder pulls them (or their lease ends).",
            labels=("role", "model"),
        )
        g.add_metric(self.labels, s.pinned_blocks)
        yield g
        for name, doc, value in (
            ("splitserve:kv_store_demotions", "Blocks moved from memory to disk.", s.demotions),
            ("splitserve:kv_store_evictions", "Blocks dropped from the shard for room.",
             s.evictions),
        ):  # fmt: skip
            c = CounterMetricFamily(name, doc, labels=("role", "model"))
            c.add_metric(self.labels, value)
            yield c
