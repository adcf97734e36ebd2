"""Overload at the router: its admission gate (router.admission) over HTTP and gRPC together.

A burst past the bounds gets only answers and quick refusals (HTTP 429 with Retry-After, gRPC
RESOURCE_EXHAUSTED), never a 5xx or a hang; the admitted requests finish; queues stay within
their bounds; and afterwards every slot is back and the system serves at full concurrency.
The gate's own rules (FIFO, cancellation, the queue's time limit, several event loops) are
tested directly, and the app config's `router.admission` reaches the router.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx2
import pytest
from prometheus_client.parser import text_string_to_metric_families

from protos.splitserve.v1 import generate_pb2 as gpb
from protos.splitserve.v1 import generate_pb2_grpc as gpb_grpc
from router.admission import AdmissionLimits, Gate, GateBusyError
from tests.kv_helpers import wait_for
from tests.router_helpers import KEY, in_use, router_stack

RUNNING, QUEUED = 2, 2
AUTH = {"Authorization": f"Bearer {KEY}"}
AUTH_MD = [("authorization", f"Bearer {KEY}")]
SHORT = {"model": "tiny", "prompt": "Hello", "max_tokens": 4, "ignore_eos": True}


@pytest.fixture(scope="module")
def stack(tiny_model_dir):
    gate = Gate(RUNNING, QUEUED, max_queue_s=120)
    with router_stack(tiny_model_dir, admission=gate, broken_models=False) as s:
        yield s


@pytest.fixture(autouse=True)
def all_back(stack):
    """After each test: every slot and KV block is back, and no 5xx was ever counted."""
    yield
    gate, main = stack.admission, stack.tenants.tenant("main")
    wait_for(lambda: (gate.running, gate.queued) == (0, 0), timeout=60)
    wait_for(lambda: (main.running, main.queued) == (0, 0), timeout=60)
    wait_for(lambda: in_use(stack) == 0, timeout=60)
    metrics = httpx2.get(f"{stack.url}/metrics", timeout=30).text
    assert 'status="5' not in metrics


def rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) << 10 for x in f if x.startswith("VmRSS:"))


def http_one(url: str, body: dict = SHORT) -> tuple[int, str | None]:
    r = httpx2.post(f"{url}/v1/completions", json=body, headers=AUTH, timeout=120)
    if r.status_code == 429:
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
    return r.status_code, r.headers.get("retry-after")


def grpc_one(target: str) -> str:
    req = gpb.GenerateRequest(model="tiny", prompt="Hello")
    req.sampling.max_tokens, req.sampling.ignore_eos = 4, True
    with grpc.insecure_channel(target) as ch:
        try:
            msgs = list(gpb_grpc.GenerateStub(ch).Generate(req, metadata=AUTH_MD, timeout=120))
        except grpc.RpcError as e:
            return e.code().name
    assert msgs[-1].usage.completion_tokens == 4
    return "OK"


def burst(stack, n_http: int, n_grpc: int) -> tuple[Counter, Counter]:
    """n_http HTTP and n_grpc gRPC requests at once; (HTTP statuses with Retry-After seen as
    (status, header)), gRPC codes)."""
    with ThreadPoolExecutor(n_http + n_grpc) as pool:
        https = [pool.submit(http_one, stack.url) for _ in range(n_http)]
        grpcs = [pool.submit(grpc_one, stack.grpc) for _ in range(n_grpc)]
        return Counter(f.result() for f in https), Counter(f.result() for f in grpcs)


@contextlib.contextmanager
def slots_held(stack, queued: int = QUEUED):
    """The gate's RUNNING slots held by long streams, and `queued` requests waiting behind
    them. Yields the waiting requests' futures (they finish once the streams are closed)."""
    body = {"model": "tiny", "prompt": "Long story", "max_tokens": 1500, "stream": True,
            "ignore_eos": True}  # fmt: skip
    with contextlib.ExitStack() as es, ThreadPoolExecutor(max(1, queued)) as pool:
        for _ in range(RUNNING):
            h = es.enter_context(httpx2.Client(timeout=60))
            r = es.enter_context(
                h.stream("POST", f"{stack.url}/v1/completions", json=body, headers=AUTH)
            )
            assert r.status_code == 200
            lines = r.iter_lines()
            next(lines)  # running: its first chunk arrived
            es.callback(lambda lines=lines: lines)  # kept: dropping it closes the stream
        wait_for(lambda: stack.admission.running == RUNNING, timeout=30)
        waiting = [pool.submit(http_one, stack.url) for _ in range(queued)]
        wait_for(lambda: stack.admission.queued == queued, timeout=30)
        yield waiting
        es.close()  # the streams end: the waiting requests run
        assert [f.result() for f in waiting] == [(200, None)] * queued


def test_burst_past_the_bounds_gets_quick_429s_and_the_admitted_finish(stack):
    gate = stack.admission
    rejected0 = gate.rejected
    with slots_held(stack) as waiting:
        http, codes = burst(stack, 16, 6)
        # Refused at once, without waiting for a slot: the held requests are still there.
        assert (gate.running, gate.queued) == (RUNNING, QUEUED)
        assert not any(f.done() for f in waiting)
    assert http == {(429, "1"): 16}, http
    assert codes == {"RESOURCE_EXHAUSTED": 6}, codes
    assert gate.rejected - rejected0 == 22
    text = httpx2.get(f"{stack.url}/metrics", timeout=30).text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert fams["splitserve:router_admission_rejected"].samples[0].value == gate.rejected
    assert fams["splitserve:router_admission_running"].samples[0].value == gate.running
    # Recovered: as many requests as the gate holds, at once, all served.
    http, codes = burst(stack, RUNNING + QUEUED - 1, 1)
    assert http == {(200, None): RUNNING + QUEUED - 1} and codes == {"OK": 1}


def test_unheld_burst_only_200s_and_429s_then_full_service(stack):
    """A burst of 10x what the gate holds, HTTP and gRPC mixed: each request is answered or
    refused with Retry-After; none fails or hangs; the queue never grows past its bound."""
    peak = {"queued": 0, "running": 0}
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.002):
            peak["queued"] = max(peak["queued"], stack.admission.queued)
            peak["running"] = max(peak["running"], stack.admission.running)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    rss0 = rss()
    try:
        http, codes = burst(stack, 30, 10)
    finally:
        stop.set()
        watcher.join(10)
    assert rss() - rss0 < 256 << 20  # the stack is in this process: its memory stays bounded
    assert set(http) <= {(200, None), (429, "1")}, http
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
    assert sum(http.values()) == 30 and sum(codes.values()) == 10
    assert http[(200, None)] + codes["OK"] >= 1  # the first to arrive is always admitted
    assert peak["queued"] <= QUEUED and peak["running"] <= RUNNING, peak
    http, codes = burst(stack, RUNNING + QUEUED, 0)
    assert http == {(200, None): RUNNING + QUEUED}


def test_waiting_past_max_queue_s_is_refused(stack):
    gate = stack.admission
    gate.max_queue_s = 0.5
    try:
        with slots_held(stack, queued=0):
            r = httpx2.post(f"{stack.url}/v1/completions", json=SHORT, headers=AUTH, timeout=60)
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert "no free slot within 0.5 s" in r.json()["error"]["message"]
            assert grpc_one(stack.grpc) == "RESOURCE_EXHAUSTED"
            assert gate.queued == 0
    finally:
        gate.max_queue_s = 120


def test_gate_fifo_cancellation_and_time_limit():
    async def go():
        g = Gate(1, 2, max_queue_s=60)
        await g.acquire()
        order = []

        async def wait(name):
            await g.acquire()
            order.append(name)

        w1, w2 = asyncio.create_task(wait("w1")), asyncio.create_task(wait("w2"))
        await asyncio.sleep(0)
        assert (g.running, g.queued) == (1, 2)
        with pytest.raises(GateBusyError, match="1 requests running and 2 queued"):
            await g.acquire()
        w1.cancel()  # leaving the queue gives the place up
        await asyncio.gather(w1, return_exceptions=True)
        assert g.queued == 1
        g.release()  # handed straight to the next in line
        await w2
        assert order == ["w2"] and (g.running, g.queued) == (1, 0)
        w3 = asyncio.create_task(wait("w3"))
        await asyncio.sleep(0)
        g.release()  # handed to w3 ...
        w3.cancel()  # ... which is cancelled before it runs: it passes the slot on
        await asyncio.gather(w3, return_exceptions=True)
        assert (g.running, g.queued) == (0, 0)
        # The queue's time limit: a refusal after max_queue_s, its place given up.
        t = Gate(1, 1, max_queue_s=0.05)
        await t.acquire()
        with pytest.raises(GateBusyError, match=r"no free slot within 0\.05 s"):
            await t.acquire()
        assert (t.running, t.queued, t.rejected) == (1, 0, 1)

    asyncio.run(go())


def test_gate_shared_by_two_event_loops():
    """A waiter on one loop gets the slot released from another thread's loop."""
    g = Gate(1, 1)
    got = threading.Event()

    async def holder_then_release(started: threading.Event):
        await g.acquire()
        started.set()
        await asyncio.to_thread(lambda: wait_for(lambda: g.queued == 1, timeout=30))
        g.release()

    async def waiter():
        await g.acquire()
        got.set()
        g.release()

    started = threading.Event()
    t = threading.Thread(target=lambda: asyncio.run(holder_then_release(started)))
    t.start()
    assert started.wait(30)
    asyncio.run(asyncio.wait_for(waiter(), 30))
    t.join(30)
    assert got.is_set() and (g.running, g.queued) == (0, 0)


def test_admission_in_the_app_config(tiny_model_dir):
    from splitserve.app_config import ConfigError, parse_config
    from splitserve.deployment import plan_deployment

    models = [{"name": "tiny", "path": "tiny"}]
    cfg = parse_config({"models": models, "router": {"admission": {"max_running": 8}}})
    plan = plan_deployment(cfg, "redis://r:6379/0", {"tiny": tiny_model_dir})
    assert plan.router.admission == AdmissionLimits(8, 1024, 30.0)
    assert parse_config({"models": models}).router.admission.limits() == AdmissionLimits()
    with pytest.raises(ConfigError, match="max_running \\+ max_queued"):
        parse_config({"models": models, "router": {"max_ongoing_requests": 100}})
    for bad in ({"max_running": 0}, {"max_queued": -1}, {"max_queue_s": 0}):
        with pytest.raises(ConfigError, match=r"router\.admission"):
            parse_config({"models": models, "router": {"admission": bad}})
    with pytest.raises(ValueError, match="max_queue_s"):
        AdmissionLimits(max_queue_s=float("nan"))
