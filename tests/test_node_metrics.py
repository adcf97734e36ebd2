"""A node's one /metrics port: every member's samples, labelled by replica, merged by family;
a member that goes is dropped, and another takes the port over when its holder leaves."""

from __future__ import annotations

import time
import urllib.request

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.parser import text_string_to_metric_families

from router.metrics import RouterMetrics
from router.tenants import Tenants, hash_key
from splitserve.node_metrics import RETRY_S, NodeMetrics, NodeMetricsConfig, serve_registry
from tests.router_helpers import free_port


def _registry(role: str, running: int) -> CollectorRegistry:
    r = CollectorRegistry()
    c = Counter("splitserve:requests", "Requests.", ("role", "status"), registry=r)
    c.labels(role, "stop").inc(3)
    g = Gauge("splitserve:num_requests_running", "Running.", ("role",), registry=r)
    g.labels(role).set(running)
    return r


def _scrape(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    assert text.count("# TYPE splitserve:requests_total counter") == 1, text
    assert "_created" not in text
    return {
        (s.name, s.labels.get("replica"), s.labels.get("role")): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def test_members_merged_and_labelled_then_taken_over(tmp_path):
    cfg = NodeMetricsConfig(free_port(), scope=f"test {tmp_path}")
    joined, endpoints = [], []
    try:
        for name, role, running in (("prefill-a", "prefill", 1), ("decode-b", "decode", 2)):
            reg = _registry(role, running)
            address, ep = serve_registry(reg)
            endpoints.append(ep)
            joined.append(NodeMetrics.join(cfg, name, reg, address))
        first, second = joined
        assert first.serving and not second.serving
        got = _scrape(cfg.port)
        assert got[("splitserve:requests_total", "prefill-a", "prefill")] == 3
        assert got[("splitserve:requests_total", "decode-b", "decode")] == 3
        assert got[("splitserve:num_requests_running", "decode-b", "decode")] == 2
        # The holder leaves: the other member takes the port over and serves alone.
        first.close()
        deadline = time.monotonic() + 10 * RETRY_S
        while not second.serving and time.monotonic() < deadline:
            time.sleep(0.1)
        assert second.serving
        got = _scrape(cfg.port)
        assert {k[1] for k in got} == {"decode-b"}
    finally:
        for n in joined:
            n.close()
        for httpd, _ in endpoints:
            httpd.shutdown()
            httpd.server_close()


def test_router_tenant_admission_metrics():
    import asyncio

    tenants = Tenants([("acme", [hash_key("k1")], 1, 0), ("beta", [hash_key("k2")], 4, 4)])
    metrics = RouterMetrics(tenants)

    async def admit():
        acme = tenants.tenant("acme")
        await acme.acquire()
        try:
            await acme.acquire()
        except Exception as e:
            return type(e).__name__
        return "admitted"

    assert asyncio.run(admit()) == "TenantBusyError"
    fams = {
        (s.name, s.labels["tenant"]): s.value
        for f in text_string_to_metric_families(metrics.render().decode())
        for s in f.samples
        if "tenant_" in s.name
    }
    assert fams[("splitserve:router_tenant_running", "acme")] == 1
    assert fams[("splitserve:router_tenant_rejected_total", "acme")] == 1
    assert fams[("splitserve:router_tenant_rejected_total", "beta")] == 0
    assert fams[("splitserve:router_tenant_queued", "beta")] == 0


def test_node_port_keeps_colons_whatever_the_scraper_accepts(tmp_path):
    """Prometheus asks for OpenMetrics first; the names it stores must stay `splitserve:*`."""
    cfg = NodeMetricsConfig(free_port(), scope=f"test {tmp_path}")
    reg = _registry("decode", 1)
    address, (httpd, _) = serve_registry(reg)
    node = NodeMetrics.join(cfg, "decode-c", reg, address)
    try:
        req = urllib.request.Request(
            f"http://127.0.0.1:{cfg.port}/metrics",
            headers={"Accept": "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"},
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            text = r.read().decode()
            assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        assert 'splitserve:requests_total{replica="decode-c",role="decode",status="stop"}' in text
        assert "splitserve_requests" not in text
    finally:
        node.close()
        httpd.shutdown()
        httpd.server_close()
