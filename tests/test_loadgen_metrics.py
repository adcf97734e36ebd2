"""Metric math on hand-computed cases, tenant service and its gap, and goodput bisection: on a
known attainment curve, and against a real simulated server whose queueing is known."""

from __future__ import annotations

import asyncio
import math

import pytest

from loadgen.arrivals import Arrivals, length_sampler, synthetic
from loadgen.fairness import tenant_service, timeline
from loadgen.goodput import search
from loadgen.http_client import HttpClient
from loadgen.metrics import SLO, distribution, summarize
from loadgen.outcome import Outcome
from loadgen.prompts import PromptFactory
from loadgen.replay import replay
from loadgen.sim_server import LatencyModel, SimServer
from loadgen.workload import ReplayConfig, plan


def _out(i, sent, chunks, end=None, tokens=None, tenant="a", warmup=False, error=None, prompt=10):
    o = Outcome(i, tenant, warmup, sent, prompt, tokens or len(chunks))
    o.sent = sent
    if chunks:
        o.first_token = chunks[0]
        o.chunk_times = list(chunks)
        o.end = end if end is not None else chunks[-1]
    o.output_tokens = tokens if tokens is not None else len(chunks)
    o.prompt_tokens = prompt
    o.error = error
    return o


def test_summary_by_hand():
    outs = [
        # TTFT 0.1; TPOT (0.25 - 0.1) / (3 - 1) = 0.075; ITLs 0.05, 0.10; e2e 0.25.
        _out(0, 0.0, [0.10, 0.15, 0.25], tokens=3),
        # One token: TTFT 0.3, no TPOT (it meets any TPOT SLO), e2e 0.3.
        _out(1, 1.0, [1.3]),
        # Usage says 5 tokens in 2 pieces: TPOT (2.6 - 2.2) / 4 = 0.1; ITL 0.4.
        _out(2, 2.0, [2.2, 2.6], tokens=5),
        _out(3, 2.5, [], error="HTTP 500: boom"),
        _out(4, -1.0, [-0.5], warmup=True),  # warm-up: out of every figure but send lag
    ]
    s = summarize(outs, SLO(ttft_s=0.25, tpot_s=0.08))
    assert (s["requests"], s["measured"], s["completed"], s["failed"]) == (5, 4, 3, 1)
    assert s["errors"] == {"HTTP 500": 1}
    assert s["ttft_s"]["count"] == 3
    assert s["ttft_s"]["mean"] == pytest.approx((0.1 + 0.3 + 0.2) / 3)
    assert s["ttft_s"]["p50"] == pytest.approx(0.2)
    assert s["tpot_s"]["count"] == 2
    assert s["tpot_s"]["mean"] == pytest.approx((0.075 + 0.1) / 2)
    assert s["itl_s"]["count"] == 3
    assert s["itl_s"]["max"] == pytest.approx(0.4)
    assert s["e2e_s"]["max"] == pytest.approx(0.6)
    # Window: first measured send (0.0) to last measured end (2.6).
    assert s["window_s"] == pytest.approx(2.6)
    assert s["throughput"]["requests_per_s"] == pytest.approx(3 / 2.6)
    assert s["throughput"]["output_tokens_per_s"] == pytest.approx((3 + 1 + 5) / 2.6)
    # TTFT <= 0.25: requests 0 and 2 (of 4 measured). TPOT <= 0.08: 0 and 1 (no decode).
    # Both: only request 0. The failed request misses both.
    assert s["attainment"] == {"ttft": 0.5, "tpot": 0.5, "both": 0.25}


def test_distribution_percentiles_interpolate():
    d = distribution([4.0, 1.0, 3.0, 2.0, math.nan])
    assert (d["count"], d["mean"], d["p50"], d["max"]) == (4, 2.5, 2.5, 4.0)
    assert d["p90"] == pytest.approx(3.7)  # 1 + 0.9 * 3 = position 3.7 between 3 and 4
    assert distribution([])["p99"] is None


def test_tenant_service_and_gap_by_hand():
    # Tenant a: one request over [0, 4]: 10 prompt tokens credited at its first token (0.5),
    # 4 output tokens in 4 pieces at 0.5, 1.5, 2.5, 3.5. Service = 1*10 + 2*4 = 18.
    # Tenant b: a request over [0, 2] (prompt 10 at 1.0; pieces at 1.0, 1.8) and one over
    # [2, 4] (prompt 10 at 2.2; pieces at 2.2, 3.9). Both tenants are busy during all of [0, 4].
    a = _out(0, 0.0, [0.5, 1.5, 2.5, 3.5], end=4.0, tenant="a")
    b1 = _out(1, 0.0, [1.0, 1.8], end=2.0, tenant="b")
    b2 = _out(2, 2.0, [2.2, 3.9], end=4.0, tenant="b")
    f = tenant_service([a, b1, b2], t0=0.0, window_s=1.0)
    assert f["t"] == [1.0, 2.0, 3.0, 4.0]
    # Per window: a = [10+2, 2, 2, 2]; b = [0, 10+2+2 (1.0 falls in [1, 2)), 10+2, 2].
    assert f["service"]["a"] == [12, 14, 16, 18]
    assert f["service"]["b"] == [0, 14, 26, 28]
    assert f["total"] == {"a": 18.0, "b": 28.0}
    # Gaps |a - b| per window: 12, 12, 10, 0 -> max 12, mean 8.5.
    assert f["gap"] == {"windows_compared": 4, "max": 12.0, "mean": 8.5, "max_at_s": 0.0}


def test_idle_tenant_is_not_owed_service():
    # b sends one short request; while it has nothing in flight, a's service is no gap.
    a = _out(0, 0.0, [0.5, 1.5, 2.5, 3.5], end=4.0, tenant="a")
    b = _out(1, 0.0, [0.5], end=0.9, tenant="b")
    f = tenant_service([a, b], t0=0.0, window_s=1.0)
    assert f["gap"]["windows_compared"] == 0
    assert f["gap"]["max"] is None


def test_timeline_counts():
    outs = [_out(0, 0.0, [0.2, 0.4], end=0.4), _out(1, 0.0, [1.2], end=1.3, tokens=4)]
    tl = timeline(outs, 0.0, 0.5)
    assert tl["t"] == [0.5, 1.0, 1.5]
    assert tl["requests_per_s"] == [2.0, 0.0, 2.0]
    assert tl["output_tokens_per_s"] == [4.0, 0.0, 8.0]


def test_bisection_on_a_known_curve():
    # Attainment falls linearly from 1 at 100 req/s to 0 at 200: it is 0.9 at exactly 110.
    calls = []

    async def measure(rate, k):
        calls.append((rate, k))
        return {"attainment": {"both": min(1.0, max(0.0, (200 - rate) / 100))}}

    res = asyncio.run(search(measure, 0.9, lo=10, hi=20, repeats=2, rel_tol=0.01))
    assert res.converged
    assert 110 * 0.99 <= res.goodput_rps <= 110
    assert res.bracket[1] > 110
    assert all(k in (0, 1) for _, k in calls) and len(calls) == 2 * len(res.probes)
    # The upper end doubled from 20 until it failed: 20, 40, 80 pass, 160 fails.
    assert [p.rate for p in res.probes[:5]] == [10, 20, 40, 80, 160]
    zero = asyncio.run(search(measure, 0.9, lo=300, hi=400, repeats=1))
    assert zero.goodput_rps == 0.0 or zero.goodput_rps <= 110


def test_goodput_against_a_server_with_known_queueing():
    """One prefill slot holding each request 10 ms: deterministic service s = 10 ms. Under
    fixed-rate arrivals at r > 1/s, request i (from 0) waits i * (s - 1/r), so its TTFT is
    s + i * (s - 1/r). With a TTFT SLO of s + 20 ms, request i meets it while
    i <= 20 ms / (s - 1/r). For 90 % of n = 60 requests to meet it, i = 53 must:
    s - 1/r <= 20/53 ms, i.e. r <= 1 / (10 - 0.377) ms = 103.9 req/s; below 100 req/s nothing
    queues. Client and event-loop overhead only add to TTFT, so the search may land lower."""
    s, slack, n = 0.010, 0.020, 60
    expected = 1 / (s - slack / 53)
    slo = SLO(ttft_s=s + slack, tpot_s=0.05, attainment=0.9)

    async def main():
        async with SimServer(LatencyModel(ttft_base_s=s, tpot_s=0.001, prefill_slots=1)) as srv:

            async def measure(rate, k):
                srv._slots = [0.0]  # an idle server at the start of each run
                tr = synthetic(
                    Arrivals("fixed", rate),
                    n,
                    k,
                    length_sampler("fixed:8"),
                    length_sampler("fixed:2"),
                )
                planned = plan(tr, ReplayConfig(), PromptFactory())
                res = await replay(planned, HttpClient(srv.url, "sim", timeout_s=10), 4)
                return summarize(res.outcomes, slo)

            return await search(measure, 0.9, lo=50, hi=200, repeats=1, rel_tol=0.03)

    res = asyncio.run(main())
    assert res.converged
    assert expected * 0.85 <= res.goodput_rps <= expected * 1.03, (res.goodput_rps, expected)
    assert all(p.attainment >= 0.95 for p in res.probes if p.rate <= 90)
    assert all(p.attainment < 0.9 for p in res.probes if p.rate >= 1.05 * expected)
