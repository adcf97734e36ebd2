"""The fairness issue's end-to-end check: a heavy on/off tenant and a steady light one replayed
over HTTP against `splitserve up` with two router replicas sharing their VTC counters in one
Redis. Under FCFS the heavy tenant's bursts starve the light one (the service gap goes past
VTC's 2U bound); under VTC the light tenant keeps more of its share (a smaller gap, a fairer
split while both are backlogged). The gap here is seen by the client, so it includes prefill
and streaming delays that a loaded 2-core machine stretches: the 2U bound itself is checked on
admission order in tests/test_router_vtc.py and measured end to end by bench/fairness_up.py
(docs/benchmarks.md). The scenario is bench/fairness_up.py's, smaller."""

from __future__ import annotations

import pytest

from bench.fairness_up import Scenario, run_order

pytestmark = pytest.mark.slow


def test_light_tenant_keeps_its_share_under_vtc_and_is_starved_under_fcfs(tmp_path):
    sc = Scenario(seconds=1.5)
    got = {order: run_order(order, sc, tmp_path, timeout_s=120.0) for order in ("vtc", "fcfs")}
    for order, r in got.items():
        assert r["failed"] == 0, (order, r["errors"])
        assert r["by_tenant"]["heavy"] > 2 * r["by_tenant"]["light"] > 0, r["by_tenant"]
        # Both replicas took requests and kept their standing in the one Redis.
        assert r["routers_sharing_counters"] == 2, r
        assert set(r["counters"]) == {"heavy", "light"}
        assert r["u"] == 256  # 2 routers x 2 sequences x 32 tokens, at 2 per output token
    vtc, fcfs = got["vtc"], got["fcfs"]
    assert not fcfs["within_2u"], fcfs["max_gap_over_u"]
    assert fcfs["max_gap"] > vtc["max_gap"], (fcfs["max_gap"], vtc["max_gap"])
    assert vtc["jain_all_backlogged"] >= fcfs["jain_all_backlogged"], (vtc, fcfs)
