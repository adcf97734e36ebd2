"""Multi-tenant workloads (on/off tenants, multi-turn sessions, priority churn) and the fairness
report (VTC's gap against 2U, Jain's index, latency tails): planned workloads checked by
construction, the report on hand-computed cases, sessions replayed against the simulated
server."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools

import numpy as np
import pytest

from loadgen.arrivals import Arrivals, synthetic
from loadgen.churn import PriorityChurn
from loadgen.fairness import FairSpec, fairness_report, jain, service_gap
from loadgen.grpc_client import GrpcClient
from loadgen.http_client import HttpClient
from loadgen.outcome import Outcome
from loadgen.prompts import PromptFactory
from loadgen.readers import read_trace
from loadgen.replay import replay
from loadgen.sessions import BLOCK_TOKENS, Sessions, conversations
from loadgen.sim_server import LatencyModel, SimServer
from loadgen.trace import Trace, TraceRequest
from loadgen.workload import ReplayConfig, Tenant, plan

# -- priority churn ------------------------------------------------------------------------------


def test_churn_specs():
    c = PriorityChurn.parse("markov:0.04:8:20")
    assert (c.pattern, c.freq, c.levels, c.step_s) == ("markov", 0.04, 8, 0.02)
    assert PriorityChurn.parse("random:0.02").levels == 4
    assert PriorityChurn.parse("fixed:3").clock().at(7, 100.0) == 3
    for bad in ("random", "random:2", "markov:0.1:0", "zigzag:0.1", "random:x", "fixed:-1"):
        with pytest.raises(ValueError, match="priorit"):
            PriorityChurn.parse(bad)


def test_random_churn_updates_at_the_frequency_and_holds_between():
    c = PriorityChurn("random", 0.04, levels=4, step_s=0.01, seed=3)
    clock = c.clock()
    # 100,000 steps at p = 0.04: 4,000 updates expected, standard deviation 62.
    n = clock.updates_before(1000.0)
    assert n == pytest.approx(4000, abs=300)
    ups = clock._updates[clock._updates < 100_000]
    # Between two updates a stream keeps its priority; across many updates it is uniform.
    for a, b in itertools.pairwise(ups[:51]):
        assert clock.at(5, (a + 0.5) * 0.01) == clock.at(5, (b - 0.5) * 0.01)
    seen = [clock.at(5, (int(u) + 0.5) * 0.01) for u in ups[:2000]]
    assert np.bincount(seen, minlength=4) / len(seen) == pytest.approx([0.25] * 4, abs=0.04)


def test_markov_churn_moves_one_level_per_update():
    c = PriorityChurn("markov", 0.5, levels=5, step_s=1.0, seed=1)
    clock = c.clock()
    n = clock.updates_before(400.0)
    levels = [clock.at(9, u + 0.5) for u in clock._updates[:n].tolist()]
    assert len(levels) > 150
    steps = np.abs(np.diff(levels))
    assert set(steps.tolist()) == {1}  # every update moved it by exactly one level
    assert min(levels) == 0 and max(levels) == 4  # and it wanders the whole range


def test_churn_is_a_function_of_the_seed_not_of_the_query_order():
    c = PriorityChurn("markov", 0.04, levels=4, step_s=0.025, seed=7)
    times = [0.1 * k for k in range(300)]
    forward = [c.clock().at(s, t) for s, t in zip(range(300), times, strict=True)]
    clock = c.clock()
    backward = [clock.at(s, t) for s, t in reversed(list(zip(range(300), times, strict=True)))]
    assert forward == backward[::-1]
    other = PriorityChurn("markov", 0.04, levels=4, step_s=0.025, seed=8)
    assert forward != [other.clock().at(s, t) for s, t in zip(range(300), times, strict=True)]


# -- tenants and sessions ------------------------------------------------------------------------


def _trace(n: int, gap: float = 0.1, prompt: int = 20, out: int = 4) -> Trace:
    return Trace("t", [TraceRequest(i * gap, prompt, out) for i in range(n)])


def test_on_off_tenant_sends_only_while_on():
    assert Tenant.parse("heavy=k:3@2:3") == Tenant("heavy", "k", 3.0, 2.0, 3.0)
    with pytest.raises(ValueError, match="@ON_S:OFF_S"):
        Tenant.parse("a=k:1@x:1")
    tenants = (Tenant("heavy", "kh", 3.0, 2.0, 3.0), Tenant("light", "kl", 1.0))
    tr = _trace(1000, gap=0.02)  # 20 s
    gated = plan(tr, ReplayConfig(tenants=tenants, seed=1), PromptFactory())
    heavy = np.array([p.at_s for p in gated if p.tenant == "heavy"])
    assert heavy.size > 200 and np.all(np.mod(heavy, 5.0) < 2.0)
    # The light tenant's requests are the same with or without the gate on the heavy one.
    ungated = (Tenant("heavy", "kh", 3.0), tenants[1])
    plain = plan(tr, ReplayConfig(tenants=ungated, seed=1), PromptFactory())
    light = [p.at_s for p in gated if p.tenant == "light"]
    assert light == [p.at_s for p in plain if p.tenant == "light"]
    assert [p.index for p in gated] == list(range(len(gated)))
    capped = plan(tr, ReplayConfig(tenants=tenants, seed=1, max_requests=50), PromptFactory())
    assert len(capped) == 50 and [p.at_s for p in capped] == [p.at_s for p in gated[:50]]


def test_conversations_grow_by_message_and_answer():
    lengths = [(10 + i, 3 + i % 5) for i in range(400)]
    convs = conversations(lengths, Sessions(4.0, 0.5), seed=2)
    assert len(convs) == 400
    assert np.mean([len(c) for c in convs]) == pytest.approx(4.0, rel=0.15)
    for c in convs:
        assert c[0].prompt_tokens == lengths[c[0].row][0] and c[0].turn == 0
        for prev, t in itertools.pairwise(c):
            msg = lengths[t.row][0]
            assert t.prompt_tokens == prev.prompt_tokens + prev.output_tokens + msg
            assert t.output_tokens == lengths[t.row][1]
    capped = conversations(lengths, Sessions(4.0), seed=2, max_prompt_tokens=60)
    assert max(t.prompt_tokens for c in capped for t in c) <= 60
    with pytest.raises(ValueError, match="TURNS"):
        Sessions.parse("x")
    with pytest.raises(ValueError, match=">= 1"):
        Sessions.parse("0.5")


def test_session_turns_resend_the_conversation_as_a_prefix():
    cfg = ReplayConfig(sessions=Sessions(3.0, 0.25), seed=4, max_prompt_tokens=400)
    planned = plan(_trace(30, prompt=25, out=5), cfg, PromptFactory(block_tokens=BLOCK_TOKENS))
    by_index = {p.index: p for p in planned}
    starts = [p for p in planned if p.follows is None]
    later = [p for p in planned if p.follows is not None]
    assert len(starts) == 30 and later and len(planned) == len(by_index)
    for p in later:
        prev = by_index[p.follows]
        assert p.session == prev.session and p.think_s == 0.25
        assert p.at_s == by_index[p.session].at_s  # a later turn carries its start's time
        # The previous prompt, its answer (stand-in words) and 25 new words.
        assert p.prompt.num_tokens == prev.prompt.num_tokens + prev.max_tokens + 25
        assert p.prompt.text.startswith(prev.prompt.text)
    # Different conversations share nothing.
    a, b = starts[0].prompt.text.split(), starts[1].prompt.text.split()
    assert a != b
    with pytest.raises(ValueError, match="prefix blocks"):
        plan(read_trace("mooncake-conversation"), cfg, PromptFactory(block_tokens=BLOCK_TOKENS))


def test_priority_goes_on_the_wire():
    p = plan(_trace(1), ReplayConfig(), PromptFactory())[0]
    assert "priority" not in HttpClient("http://127.0.0.1:1/v1", "m").body(p).decode()
    p2 = dataclasses.replace(p, priority=2)
    assert b'"priority":2' in HttpClient("http://127.0.0.1:1/v1", "m").body(p2)
    assert GrpcClient("grpc://127.0.0.1:1", "m").request(p2).priority == 2
    assert not GrpcClient("grpc://127.0.0.1:1", "m").request(p).HasField("priority")


def test_sessions_and_churn_replayed_against_the_simulated_server():
    churn = PriorityChurn("random", 0.5, levels=3, step_s=0.01, seed=1)
    tenants = (Tenant("a", "ka", 1.0), Tenant("b", "bad-key", 1.0))
    cfg = ReplayConfig(tenants=tenants, sessions=Sessions(3.0, 0.02), seed=5, priorities=churn)
    tr = synthetic(
        Arrivals("fixed", 50.0), 12, 0, lambda n, r: np.full(n, 8), lambda n, r: np.full(n, 3)
    )
    planned = plan(tr, cfg, PromptFactory(block_tokens=BLOCK_TOKENS))
    later = [p for p in planned if p.follows is not None]
    assert later

    async def main():
        async with SimServer(LatencyModel(0.002, 0.0, 0.001), api_keys={"ka": "a"}) as srv:
            client = HttpClient(srv.url, "sim", timeout_s=20.0)
            return await replay(planned, client, 4, drain_timeout_s=60.0, priorities=churn)

    res = asyncio.run(main())
    out = {o.index: o for o in res.outcomes}
    assert sorted(out) == sorted(p.index for p in planned)  # every turn accounted for
    for p in planned:
        o = out[p.index]
        if p.tenant == "b":  # its key is refused: first turns fail, later ones are not sent
            want = "HTTP 401" if p.follows is None else "previous turn failed"
            assert o.error.startswith(want), o.error
            continue
        assert o.ok, o.error
        assert o.prompt_tokens == p.prompt.num_tokens
        assert o.priority in (0, 1, 2)
        if p.follows is not None:
            prev = out[p.follows]
            assert o.scheduled >= prev.end + 0.02 - 1e-6 and o.sent >= o.scheduled - 1e-3
    prios = {o.priority for o in res.outcomes if o.ok}
    assert len(prios) > 1  # at 0.5 updates per 10 ms step, priorities moved


# -- the fairness report ---------------------------------------------------------------------


def _out(i, tenant, sent, end, first, chunks, prompt, tokens, priority=None):
    o = Outcome(i, tenant, False, sent, prompt, tokens)
    o.sent, o.end, o.first_token = sent, end, first
    o.chunk_times, o.prompt_tokens, o.output_tokens = list(chunks), prompt, tokens
    o.priority = priority
    return o


def test_vtc_gap_over_any_interval_by_hand():
    # a: two requests sent at 0; the first starts at 1 (prompt 10, then 1 output token, service
    # 2, at t = 1..4), the second waits until 5 (prompt 10; tokens at 5..8). a waits [0, 5].
    # b: one request sent at 2 that waits until 9 (prompt 4; tokens at 9 and 9.5).
    a1 = _out(0, "a", 0.0, 4.0, 1.0, [1, 2, 3, 4], 10, 4)
    a2 = _out(1, "a", 0.0, 8.0, 5.0, [5, 6, 7, 8], 10, 4)
    b = _out(2, "b", 2.0, 10.0, 9.0, [9, 9.5], 4, 2)
    g = service_gap([a1, a2, b], 0.0, FairSpec(pool_tokens=5))
    # Both wait over [2, 5]: a gets 2 at t = 2, 3, 4 and 10 + 2 at 5, b nothing: gap 18. (After
    # 5, a has nothing waiting: it is not backlogged, and b's wait owes it nothing more.)
    assert g["max_gap"] == pytest.approx(18.0)
    assert g["max_gap_between"] == {"tenants": ["a", "b"], "from_s": 2.0, "to_s": 5.0}
    # U = max(1 * longest prompt 10, 2 * 5 pool tokens) = 10: the gap is 1.8 U, within 2U.
    assert (g["u"], g["max_gap_over_u"], g["within_2u"]) == (10.0, 1.8, True)
    assert g["service_over_weight"] == {"a": 36.0, "b": 8.0}
    assert g["jain"] == pytest.approx(44**2 / (2 * (36**2 + 8**2)))
    assert g["all_backlogged_s"] == 3.0
    # Weighted: a's share is half, so its service counts double: 36 over [2, 5], past 2U = 20.
    w = service_gap([a1, a2, b], 0.0, FairSpec(weights={"a": 0.5}, pool_tokens=5))
    assert w["max_gap"] == pytest.approx(36.0) and w["within_2u"] is False
    # Without a pool size there is no U.
    assert service_gap([a1, a2, b], 0.0, FairSpec())["u"] is None


def test_idle_tenant_and_jain():
    a = _out(0, "a", 0.0, 4.0, 0.5, [0.5, 1.5, 2.5, 3.5], 10, 4)
    b = _out(1, "b", 5.0, 6.0, 5.5, [5.5], 10, 1)  # never backlogged with a
    g = service_gap([a, b], 0.0, FairSpec())
    assert g["max_gap"] is None and g["all_backlogged_s"] == 0.0
    assert g["jain_all_backlogged"] is None
    assert jain([1, 1, 1]) == 1.0 and jain([1, 0]) == 0.5 and jain([]) is None


def test_tails_per_tenant_and_priority():
    first = [0.01 * (i + 1) for i in range(30)]
    outs = [
        _out(i, "a" if i % 2 else "b", 0.0, 2.5, first[i], [first[i], 1.0, 2.5], 5, 3,
             priority=i % 3)
        for i in range(30)
    ]  # fmt: skip
    f = fairness_report(outs, 0.0, 0.5, FairSpec(pool_tokens=100))
    tails = f["tails"]
    assert tails["all"]["ttft_s"]["p99"] == pytest.approx(float(np.percentile(first, 99)))
    assert tails["all"]["ttft_s"]["count"] == 30 and tails["all"]["tbt_s"]["count"] == 60
    tbt = [1.0 - x for x in first] + [1.5] * 30
    assert tails["all"]["tbt_s"]["p50"] == pytest.approx(float(np.percentile(tbt, 50)))
    assert tails["all"]["tbt_s"]["p999"] == pytest.approx(1.5)
    assert set(tails["tenants"]) == {"a", "b"} and set(tails["priorities"]) == {"0", "1", "2"}
    assert tails["priorities"]["0"]["ttft_s"]["count"] == 10
    assert f["vtc"]["u"] == 200.0 and f["service"]  # the windowed series is still there
