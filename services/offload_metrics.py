"""Prometheus view of a model worker's attention offload: round trips, bytes, idle time."""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from services.engine.offload_plan import OffloadCounters


class OffloadCollector(Collector):
    """Read on the scrape thread from the runner's counters (plain numbers, only added to)."""

    def __init__(self, role: str, model: str, counters: OffloadCounters) -> None:
        self.labels = [role, model]
        self.c = counters

    def collect(self):
        c, labels = self.c, ("role", "model")
        for name, doc, value in (
            ("splitserve:offload_steps", "Forward passes with attention on attention workers.",
             c.steps),
            ("splitserve:offload_step_seconds", "Time in those passes, start to logits.",
             c.step_seconds),
            ("splitserve:offload_idle_seconds",
             "Of which the model worker waited for attention workers (idle).", c.wait_seconds),
            ("splitserve:offload_round_trips", "Layer batches sent and answered.", c.round_trips),
            ("splitserve:offload_round_trip_seconds",
             "Time from a layer batch's last send to its answer, summed.", c.round_trip_seconds),
            ("splitserve:offload_token_layers", "Tokens times layers sent (bytes' denominator).",
             c.token_layers),
        ):  # fmt: skip
            m = CounterMetricFamily(name, doc, labels=labels)
            m.add_metric(self.labels, value)
            yield m
        m = CounterMetricFamily(
            "splitserve:offload_bytes", "Bytes of q, k, v sent and of o received.",
            labels=(*labels, "direction"),
        )  # fmt: skip
        m.add_metric([*self.labels, "sent"], c.bytes_sent)
        m.add_metric([*self.labels, "received"], c.bytes_received)
        yield m
