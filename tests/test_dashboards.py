"""The Grafana dashboards: current with their builder, shipped unchanged by the chart, and every
query checked against the real thing: a `splitserve up` (router, prefill, decode, colocated and
attention replicas, API keys) under a short load, scraped on its one metrics port by a real
Prometheus. Each query names only metrics the services export and returns data."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml

from router.tenants import hash_key
from tests.helm_helpers import ROOT
from tests.prometheus_helpers import query, running_prometheus
from tests.router_helpers import free_port
from tests.up_helpers import start_up, stop_up

DASHBOARDS = sorted((ROOT / "deploy/grafana/dashboards").glob("*.json"))
METRIC = re.compile(r"splitserve:[A-Za-z0-9_:]+")
RATE_INTERVAL = "15s"  # what Grafana's $__rate_interval is at a 1 s scrape interval, roughly


def _queries() -> list[tuple[str, str, str]]:
    """(dashboard, panel, PromQL with the dashboard's variables filled in)."""
    out = []
    for path in DASHBOARDS:
        d = json.loads(path.read_text())
        consts = {v["name"]: v["query"] for v in d["templating"]["list"] if v["type"] == "constant"}
        for panel in d["panels"]:
            for t in panel.get("targets", []):
                expr = t["expr"].replace("$__rate_interval", RATE_INTERVAL)
                for name, value in consts.items():
                    expr = expr.replace(f"${name}", value)
                assert "$" not in expr, (
                    f"{path.name}: {panel['title']}: unfilled variable in {expr}"
                )
                out.append((path.stem, panel["title"], expr))
    return out


def test_dashboards_current_and_shipped_by_the_chart():
    r = subprocess.run(
        [sys.executable, str(ROOT / "deploy/grafana/build.py"), "--check"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    from tests.helm_helpers import render

    maps = {k: v for d in render() if d["kind"] == "ConfigMap" for k, v in d["data"].items()}
    assert set(maps) == {p.name for p in DASHBOARDS}
    for p in DASHBOARDS:
        assert json.loads(maps[p.name]) == json.loads(p.read_text())
    cm = next(d for d in render() if d["kind"] == "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"


def test_dashboards_are_well_formed():
    sections = {"splitserve-overview", "splitserve-tenants", "splitserve-kv", "splitserve-replicas"}
    assert {p.stem for p in DASHBOARDS} == sections
    for p in DASHBOARDS:
        d = json.loads(p.read_text())
        assert d["uid"] == p.stem and d["panels"]
        ids = [panel["id"] for panel in d["panels"]]
        assert len(set(ids)) == len(ids)
        for panel in d["panels"]:
            assert panel["datasource"]["uid"] == "${datasource}"
            assert panel["targets"] and all(t["expr"] for t in panel["targets"])


# -- against a running system ----------------------------------------------------------------


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dash")
    keys = {"acme": "key-acme-0123", "beta": "key-beta-4567"}
    (tmp / "tenants.yaml").write_text(yaml.safe_dump({"tenants": [
        {"name": "acme", "keys": [hash_key(keys["acme"])], "max_concurrent": 8, "max_queued": 8},
        {"name": "beta", "keys": [hash_key(keys["beta"])], "max_concurrent": 1, "max_queued": 0},
    ]}))  # fmt: skip
    port, gport, mport = free_port(), free_port(), free_port()
    cfg = {
        "http": {"host": "127.0.0.1", "port": port},
        "grpc": {"host": "127.0.0.1", "port": gport},
        "auth": {"enabled": True, "tenants_file": str(tmp / "tenants.yaml")},
        "metrics": {"port": mport},
        "models": [
            # Prefill and decode: KV published and pulled through the store.
            {"name": "tiny", "path": "tiny", "mode": "disaggregated"},
            # A pool too small for long prompts: the replica borrows from the attention one.
            {"name": "tiny-long", "path": "tiny", "mode": "colocated",
             "engine": {"block_size": 16, "num_kv_blocks": 16},
             "attention": {"replicas": 1, "num_kv_blocks": 128}},
        ],
    }  # fmt: skip
    (tmp / "app.yaml").write_text(yaml.safe_dump(cfg))
    up = start_up(["--config", str(tmp / "app.yaml")])
    try:
        # Said on stderr right after the URL on stdout: read (bounded) until it is there.
        where = f"http://127.0.0.1:{mport}/metrics"
        deadline = time.monotonic() + 30
        while where not in "".join(up["stderr"]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert where in "".join(up["stderr"]), "".join(up["stderr"])[-2000:]
        with running_prometheus([f"127.0.0.1:{mport}"], tmp) as prom:
            yield {"url": up["url"], "keys": keys, "metrics": f"127.0.0.1:{mport}", "prom": prom}
    finally:
        stop_up(up["proc"])


def _scrape_names(address: str, names: set[str]) -> None:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("# TYPE "):
                names.add(line.split()[2])
            elif line and not line.startswith("#"):
                names.add(re.split(r"[{ ]", line, maxsplit=1)[0])


def _samples(prom: str, metric: str) -> int:
    """How many scrapes in the last minute held `metric` (its most-scraped series)."""
    r = query(prom, "query", query=f"max(count_over_time({metric}[1m]))")["result"]
    return int(float(r[0]["value"][1])) if r else 0


def _sample_lines(address: str) -> list[str]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
        return [ln for ln in r.read().decode().splitlines() if ln and not ln.startswith("#")]


def _wait_scraped(prom: str, after: float, metric: str) -> None:
    """Until (bounded) Prometheus holds a sample of `metric` scraped after `after` + 1 s."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        r = query(prom, "query", query=f"max(timestamp({metric}))")
        if r["result"] and float(r["result"][0]["value"][1]) > after + 1:
            return
        time.sleep(0.3)
    targets = query(prom, "targets")["activeTargets"]
    pytest.fail(f"prometheus has no {metric} scraped after {after}: {targets}")


def _load(system) -> set[str]:
    """A short, bounded load through the HTTP API; returns the metric names scraped meanwhile.
    A first request of each kind makes every series, and Prometheus scrapes them, before the
    load: rate() then sees the load's increases whatever the scrapes' timing."""
    import httpx

    url, keys = system["url"], system["keys"]
    names: set[str] = set()
    done = threading.Event()

    def scraper():
        while not done.wait(0.3):
            _scrape_names(system["metrics"], names)

    def call(key: str, body: dict, stream: bool = False) -> int:
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(timeout=120) as h:
            if not stream:
                return h.post(f"{url}/v1/completions", json=body, headers=headers).status_code
            with h.stream("POST", f"{url}/v1/completions", json={**body, "stream": True},
                          headers=headers) as r:  # fmt: skip
                for _ in r.iter_lines():
                    pass
                return r.status_code

    base = {"model": "tiny", "max_tokens": 24, "temperature": 0, "ignore_eos": True}

    def borrow_until_scraped() -> int:
        """A prompt longer than tiny-long's own pool, decoding until Prometheus has scraped the
        loan from both sides three times (bounded): the lending gauges exist only while a loan
        does, and a series scraped once, then gone, may fall between the points a range query
        evaluates; a loan that ended before that is made again."""
        deadline = time.monotonic() + 120
        status, seen = 0, False
        for _ in range(4):
            status, seen = borrow_once(deadline)
            if seen or time.monotonic() > deadline:
                break
        if not seen:  # say which side failed: the loan, or Prometheus's scrapes of it
            now = [ln for ln in _sample_lines(system["metrics"]) if "kv_blocks_" in ln]
            targets = query(system["prom"], "targets")["activeTargets"]
            pytest.fail(
                f"no loan scraped by Prometheus; {len(loans)} samples of one seen directly "
                f"(last: {loans[-4:]}); now: {now}; targets: {targets}"
            )
        return status

    def borrow_once(deadline: float) -> tuple[int, bool]:
        body = {**base, "model": "tiny-long", "prompt": long_prompt, "max_tokens": 1200,
                "stream": True}  # fmt: skip
        headers = {"Authorization": f"Bearer {keys['acme']}"}
        gauges = ("splitserve:kv_blocks_lent", "splitserve:kv_blocks_borrowed")
        next_look, seen = 0.0, False
        with (
            httpx.Client(timeout=120) as h,
            h.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as r,
        ):
            for _ in r.iter_lines():
                now = time.monotonic()
                if now >= next_look:
                    next_look = now + 0.3
                    loans.extend(ln for ln in _sample_lines(system["metrics"])
                                 if ln.startswith(gauges))  # fmt: skip
                    seen = all(_samples(system["prom"], m) >= 3 for m in gauges)
                    if seen or now > deadline:
                        break
            return r.status_code, seen

    loans: list[str] = []  # the gauges' samples read straight from /metrics while borrowing
    long_prompt = " ".join(["the quick brown fox jumps over the lazy dog"] * 40)
    warm = [call(keys["acme"], {**base, "prompt": "warm"}, s) for s in (False, True)]
    warm.append(call(keys["acme"], {**base, "model": "tiny-long", "prompt": "warm"}))
    warm.append(call(keys["beta"], {**base, "prompt": "warm"}))
    assert warm == [200] * 4 and call("not-a-key", {**base, "prompt": "warm"}) == 401
    _wait_scraped(system["prom"], time.time(), "splitserve:router_requests_total")
    t = threading.Thread(target=scraper, daemon=True)
    t.start()
    try:
        with ThreadPoolExecutor(12) as pool:
            # beta may run one at a time: a second one while the first runs is refused.
            first = pool.submit(call, keys["beta"], {**base, "max_tokens": 400, "prompt": "a"}, 1)
            borrow = pool.submit(borrow_until_scraped)
            plain = [
                pool.submit(call, keys["acme"], {**base, "prompt": f"Request {i} shares"}, i % 2)
                for i in range(8)
            ]
            time.sleep(0.3)
            second = call(keys["beta"], {**base, "prompt": "b"})
            unauthorized = call("not-a-key", {**base, "prompt": "c"})
            statuses = [f.result() for f in [first, borrow, *plain]]
        assert statuses == [200] * len(statuses)
        assert unauthorized == 401
        assert second in (200, 429)
    finally:
        done.set()
        t.join(10)
    _scrape_names(system["metrics"], names)
    return names


@pytest.mark.slow
def test_every_dashboard_query_returns_data_from_prometheus(system):
    prom = system["prom"]
    # Prometheus scrapes a few seconds after it is ready: the load starts once it has twice.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        r = query(prom, "query", query="count_over_time(up[1m])")
        if r["result"] and float(r["result"][0]["value"][1]) >= 2:
            break
        time.sleep(0.5)
    else:
        pytest.fail("prometheus did not scrape splitserve up")
    t0 = time.time()
    exported = _load(system)
    _wait_scraped(prom, time.time(), "splitserve:engine_steps_total")

    queries = _queries()
    assert len(queries) >= 30
    unknown = sorted(
        {(d, p, m) for d, p, e in queries for m in METRIC.findall(e) if m not in exported}
    )
    assert not unknown, f"queries name metrics the services do not export: {unknown}"

    empty = []
    for dash, panel, expr in queries:
        data = query(prom, "query_range", query=expr, start=t0 - 2, end=time.time(), step=1)
        values = [float(v) for s in data["result"] for _, v in s["values"]]
        if not any(math.isfinite(v) for v in values):
            empty.append(f"{dash} / {panel}: {expr}")
    assert not empty, "queries with no data:\n" + "\n".join(empty)
