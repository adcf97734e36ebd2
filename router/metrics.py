"""Prometheus metrics of the router's HTTP API (`splitserve:router_*`), served as GET /metrics.

One `RouterMetrics` per app, with its own `CollectorRegistry` (several apps in one process never
collide). A request is counted once, when its response starts, by the HTTP status it gets (499:
the client left first); an error inside a started stream is counted by the replica that failed
(services/metrics.py), not here. Only served model names and configured tenant names become
label values, so clients cannot grow the series count.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

# Router time to the response start: the first token for streams, the whole answer otherwise.
RESPONSE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._requests = Counter(
            "splitserve:router_requests",
            "HTTP requests answered, by endpoint, model, tenant and HTTP status",
            ["endpoint", "model", "tenant", "status"],
            registry=self.registry,
        )
        self._response = Histogram(
            "splitserve:router_response_start_seconds",
            "request arrival -> response start (first token of a stream), by endpoint and model",
            ["endpoint", "model"],
            buckets=RESPONSE_BUCKETS,
            registry=self.registry,
        )

    def record(self, endpoint: str, model: str, tenant: str, status: int, seconds: float) -> None:
        """model and tenant: "" unless served / configured (label values stay bounded)."""
        self._requests.labels(endpoint, model, tenant, str(status)).inc()
        if status < 400:
            self._response.labels(endpoint, model).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
