"""Fair admission (router.vtc, router.fair_backend): two router replicas sharing their counters
through one real Redis, the counter lift, restart, cancellation, priorities, config errors."""

from __future__ import annotations

import asyncio

import pytest

from protos.splitserve.v1 import common_pb2 as cpb
from router.fair_backend import FairBackend
from router.tenants import Tenants, TenantsConfigError, hash_key
from router.vtc import VTC, FairnessConfig
from rpc.piece import Piece
from services.engine.sampling_params import SamplingParams


class _Sim:
    """Pieces of one token each after a short sleep; records admissions (tenant, priority)."""

    def __init__(self) -> None:
        self.started: list[tuple[str, int]] = []

    def models(self):
        return [("m", 1 << 20)]

    async def generate(self, model, prompt_ids, params, request_id, tenant="", priority=0):
        self.started.append((tenant, priority))
        for i in range(params.max_tokens):
            await asyncio.sleep(0.002)
            last = i == params.max_tokens - 1
            usage = cpb.Usage(prompt_tokens=len(prompt_ids), completion_tokens=i + 1)
            yield Piece(
                [7], "x", finish_reason="length" if last else "", usage=usage if last else None
            )


async def _drain(backend, tenant: str, n_out: int = 4, n_in: int = 4) -> None:
    params = SamplingParams(max_tokens=n_out)
    async for _ in backend.generate("m", [1] * n_in, params, "r", tenant=tenant):
        pass


async def _two_routers(redis_url: str, ns: str, order: str) -> list[tuple[str, int]]:
    """Two replicas (one slot each) share a namespace; tenant `heavy` queues 12 requests on
    each before `light` queues 12 on each. Returns the admissions in order."""
    sim = _Sim()
    cfg = FairnessConfig(order=order, max_inflight=1)
    routers = [FairBackend(sim, VTC(redis_url, ns, cfg, router_id=f"r{i}")) for i in range(2)]
    try:
        tasks = [asyncio.create_task(_drain(b, "heavy")) for _ in range(12) for b in routers]
        for _ in range(500):  # heavy is backlogged first: all 24 queued or admitted
            if sum(b.vtc.num_waiting for b in routers) + len(sim.started) >= 24:
                break
            await asyncio.sleep(0.01)
        tasks += [asyncio.create_task(_drain(b, "light")) for _ in range(12) for b in routers]
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
    finally:
        for b in routers:
            await b.close()
    return sim.started


def test_two_routers_share_one_fair_order(redis_url, namespace):
    vtc = asyncio.run(_two_routers(redis_url, namespace + "v", "vtc"))
    fcfs = asyncio.run(_two_routers(redis_url, namespace + "f", "fcfs"))
    assert len(vtc) == len(fcfs) == 48
    # FCFS serves every heavy request that came first; VTC alternates once light is backlogged.
    assert [t for t, _ in fcfs[:24]] == ["heavy"] * 24
    i0 = [t for t, _ in vtc].index("light")
    after = [t for t, _ in vtc[i0 : i0 + 20]]
    assert i0 <= 8 and len(after) == 20, vtc
    # Every prefix of the order since keeps the two tenants' admitted work close: a request
    # costs 4 + 2 * 4 = 12; U = 2 * 16 (two in flight, 8 tokens each), so 2U is 5 requests.
    for k in range(1, 21):
        h = after[:k].count("heavy")
        assert abs(h - (k - h)) <= 5, (k, after)
    assert all(0 <= p < 8 for _, p in vtc)


def test_counters_survive_a_restart_and_lift(redis_url, namespace):
    async def go():
        cfg = FairnessConfig(max_inflight=4)
        sim = _Sim()
        a = FairBackend(sim, VTC(redis_url, namespace, cfg, router_id="a"))
        await _drain(a, "t1", n_out=4, n_in=10)  # 10 + 2*4 = 18
        await a.close()
        b = VTC(redis_url, namespace, cfg, router_id="b")
        c = await b.counters()
        assert c["t1"] == pytest.approx(18.0)
        # t2 returns from idle while nobody is backlogged: lifted to the last tenant to leave.
        fb = FairBackend(sim, b)
        await _drain(fb, "t2", n_out=1, n_in=1)
        c = await b.counters()
        assert c["t2"] == pytest.approx(18.0 + 1 + 2)
        # Cached prompt tokens are refunded when the usage reports them.
        async with b.admit("t3", 5) as slot:
            slot.cached(5)
        c = await b.counters()
        assert c["t3"] == pytest.approx(c["t2"])  # lifted to t2's, + 5 - 5
        await fb.close()

    asyncio.run(go())


def test_weights_divide_the_charge_and_cancel_leaves_the_backlog(redis_url, namespace):
    async def go():
        cfg = FairnessConfig(max_inflight=1, weights={"big": 2.0})
        vtc = VTC(redis_url, namespace, cfg, router_id="w")
        try:
            async with vtc.admit("big", 8) as s:
                s.output(4)
            async with vtc.admit("small", 8) as s:
                s.output(4)
            c = await vtc.counters()
            assert c["big"] == pytest.approx((8 + 8) / 2)
            assert c["small"] == pytest.approx(8 + 8 + 8)  # lifted to big's, + 8 + 2 * 4
            # Hold the only slot; a second request waits, then is cancelled.
            hold = vtc.admit("big", 1)
            await hold.__aenter__()
            waiter = asyncio.create_task(vtc.admit("small", 1).__aenter__())
            await asyncio.sleep(0.05)
            assert vtc.num_waiting == 1
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
            q = await vtc.r.hgetall(vtc._keys[2])
            assert q == {}  # no request of this router counts as backlog any more
            await hold.__aexit__(None, None, None)
            assert vtc.inflight == 0
        finally:
            await vtc.close()

    asyncio.run(go())


def _doc(fairness: dict) -> dict:
    return {
        "tenants": [
            {"name": "a", "keys": [hash_key("ka")]},
            {"name": "b", "keys": [hash_key("kb")]},
        ],
        "fairness": fairness,
    }


@pytest.mark.parametrize(
    "fairness, match",
    [
        ({"weights": {"a": 0.0}}, r"fairness\.weights\.a: a share must be a positive number"),
        ({"weights": {"a": -1.0}}, r"fairness\.weights\.a: a share must be a positive"),
        ({"weights": {"zed": 1.0}}, r"fairness\.weights\.zed: unknown tenant 'zed'"),
        ({"priorities": {"nobody": 1}}, r"fairness\.priorities\.nobody: unknown tenant"),
        ({"priorities": {"a": 9}}, r"fairness\.priorities\.a: must be within \[0, 8\)"),
        ({"order": "lifo"}, r"fairness\.order: order must be vtc or fcfs"),
        ({"max_inflight": 0}, r"fairness\.max_inflight"),
        ({"output_weight": 0}, r"fairness\.output_weight"),
    ],
)
def test_fairness_config_errors_name_the_field(fairness, match):
    with pytest.raises(TenantsConfigError, match=match):
        Tenants.from_dict(_doc(fairness))


def test_fairness_config_loads():
    t = Tenants.from_dict(_doc({"weights": {"a": 2}, "priorities": {"b": 3}, "order": "fcfs"}))
    assert t.fairness == FairnessConfig(order="fcfs", weights={"a": 2.0}, priorities={"b": 3})
    assert Tenants.from_dict({"tenants": _doc({})["tenants"]}).fairness is None


def test_priority_from_standing_floor_and_request(redis_url, namespace):
    async def go():
        sim = _Sim()
        cfg = FairnessConfig(max_inflight=1, priorities={"floored": 2})
        r1 = FairBackend(sim, VTC(redis_url, namespace, cfg, router_id="p1"))
        r2 = VTC(redis_url, namespace, cfg, router_id="p2")
        try:
            # On r2, tenant `behind` waits behind a held slot: it is backlogged.
            hold = r2.admit("other", 1)
            await hold.__aenter__()
            waiter = asyncio.create_task(r2.admit("behind", 1).__aenter__())
            await asyncio.sleep(0.05)
            await r2.r.hset(r2._keys[0], mapping={"behind": 0, "ahead": 100})
            # `ahead` has had more than a backlogged tenant: it runs behind it in the engines.
            await _drain(r1, "ahead")
            await _drain(r1, "floored")
            params = SamplingParams(max_tokens=1)
            async for _ in r1.generate("m", [1], params, "x", tenant="ahead", priority=0):
                pass
            async for _ in r1.generate("m", [1], params, "y", tenant="floored", priority=1):
                pass
            assert sim.started == [("ahead", 1), ("floored", 2), ("ahead", 0), ("floored", 2)]
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
            await hold.__aexit__(None, None, None)
        finally:
            await r1.close()
            await r2.close()

    asyncio.run(go())
