"""Prometheus metrics of the router's HTTP API (`splitserve:router_*`), served as GET /metrics.

One `RouterMetrics` per app, with its own `CollectorRegistry` (several apps in one process never
collide). A request is counted once, when its response starts, by the HTTP status it gets (499:
the client left first); an error inside a started stream is counted by the replica that failed
(services/metrics.py), not here. Only served model names and configured tenant names become
label values, so clients cannot grow the series count. The router's admission gate and, with
tenants, theirs (running, queued, refused) are read at scrape time.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from router.admission import Gate
from router.tenants import Tenants

# Router time to the response start: the first token for streams, the whole answer otherwise.
RESPONSE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class RouterMetrics:
    def __init__(self, tenants: Tenants | None = None, admission: Gate | None = None) -> None:
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
        self._resumed = Counter(
            "splitserve:requests_resumed",
            "Requests continued on another replica after the one serving them was lost "
            "(killed, restarting, drained): each resumption once, HTTP and gRPC",
            ["model"],
            registry=self.registry,
        )
        self._resume_failed = Counter(
            "splitserve:requests_resume_failed",
            "Requests whose replica was lost and that no other replica could continue: they "
            "ended with an error",
            ["model"],
            registry=self.registry,
        )
        if tenants is not None:
            self.registry.register(TenantCollector(tenants))
        if admission is not None:
            self.registry.register(AdmissionCollector(admission))

    def record(self, endpoint: str, model: str, tenant: str, status: int, seconds: float) -> None:
        """model and tenant: "" unless served / configured (label values stay bounded)."""
        self._requests.labels(endpoint, model, tenant, str(status)).inc()
        if status < 400:
            self._response.labels(endpoint, model).observe(seconds)

    def resumed(self, model: str) -> None:
        self._resumed.labels(model).inc()

    def resume_failed(self, model: str) -> None:
        self._resume_failed.labels(model).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class TenantCollector(Collector):
    """Each configured tenant's admission, read on the scrape thread (plain ints: a scrape may
    see one request's change a step late, never a torn value)."""

    def __init__(self, tenants: Tenants) -> None:
        self.tenants = tenants

    def collect(self):
        running = GaugeMetricFamily(
            "splitserve:router_tenant_running",
            "The tenant's requests running (at most its max_concurrent).",
            labels=("tenant",),
        )
        queued = GaugeMetricFamily(
            "splitserve:router_tenant_queued",
            "The tenant's requests waiting for a slot (at most its max_queued).",
            labels=("tenant",),
        )
        rejected = CounterMetricFamily(
            "splitserve:router_tenant_rejected",
            "The tenant's requests refused with HTTP 429 / RESOURCE_EXHAUSTED: running and "
            "queued were at the tenant's limits.",
            labels=("tenant",),
        )
        for name in self.tenants.names:
            t = self.tenants.tenant(name)
            running.add_metric([name], t.running)
            queued.add_metric([name], t.queued)
            rejected.add_metric([name], t.rejected)
        yield running
        yield queued
        yield rejected


class AdmissionCollector(Collector):
    """The router replica's admission gate over all its requests (router.admission)."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate

    def collect(self):
        g = self.gate
        yield GaugeMetricFamily(
            "splitserve:router_admission_running",
            "Requests this router replica runs (at most router.admission.max_running).",
            value=g.running,
        )
        yield GaugeMetricFamily(
            "splitserve:router_admission_queued",
            "Requests waiting for a slot (at most router.admission.max_queued).",
            value=g.queued,
        )
        yield CounterMetricFamily(
            "splitserve:router_admission_rejected",
            "Requests refused with HTTP 429 / RESOURCE_EXHAUSTED at the router's limits: full, "
            "or no slot within max_queue_s.",
            value=g.rejected,
        )
