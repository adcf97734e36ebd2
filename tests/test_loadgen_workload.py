"""Synthetic arrivals and lengths (statistics for fixed seeds), exact-length prompts with a real
tokenizer, Mooncake prefix sharing, and planning: scaling, caps, warm-up, tenants."""

from __future__ import annotations

import numpy as np
import pytest

from loadgen.arrivals import Arrivals, length_sampler, synthetic
from loadgen.prompts import PromptFactory
from loadgen.readers import read_trace
from loadgen.trace import Trace, TraceRequest
from loadgen.workload import ReplayConfig, Tenant, block_tokens, plan
from services.engine.tokenizer import load_tokenizer

N = 20_000


def _gaps(spec: str, seed: int = 1) -> np.ndarray:
    return np.diff(Arrivals.parse(spec).times(N, np.random.default_rng(seed)))


@pytest.mark.parametrize(
    ("spec", "cv"),
    [("fixed:50", 0.0), ("poisson:50", 1.0), ("gamma:50:2", 2.0), ("gamma:50:0.5", 0.5)],
)
def test_arrival_rate_and_burstiness(spec, cv):
    g = _gaps(spec)
    # 20,000 gaps: the mean's relative standard error is cv/sqrt(N) < 1.5 %; the CV's is similar
    # for the exponential and a few percent for the heavy gamma.
    assert 1 / g.mean() == pytest.approx(50, rel=0.03)
    assert g.std() / g.mean() == pytest.approx(cv, abs=0.06 * max(cv, 1))


def test_onoff_bursts():
    a = Arrivals.parse("onoff:100:2:3")
    t = a.times(N, np.random.default_rng(2))
    assert a.mean_rate == 40.0
    assert (len(t) - 1) / t[-1] == pytest.approx(40, rel=0.03)
    # Nothing arrives in the off-periods: the time modulo the 5 s cycle is within the 2 s on.
    assert np.all(np.mod(t, 5.0) < 2.0 + 1e-9)


def test_with_rate_keeps_the_shape():
    a = Arrivals.parse("onoff:100:2:3").with_rate(10)
    assert (a.kind, a.mean_rate, a.on_s, a.off_s) == ("onoff", 10, 2, 3)


def test_zipf_lengths():
    x = length_sampler("zipf:1.1:1:1000")(N, np.random.default_rng(3))
    assert x.min() >= 1 and x.max() <= 1000
    # P(k) = k^-1.1 / H with H = sum_{k<=1000} k^-1.1 = 5.5728: P(1) = 0.1794, P(2) = 0.0837.
    h = (np.arange(1, 1001) ** -1.1).sum()
    assert h == pytest.approx(5.5728, abs=1e-4)
    assert (x == 1).mean() == pytest.approx(1 / h, abs=0.01)
    assert (x == 2).mean() == pytest.approx(2**-1.1 / h, abs=0.01)


def test_bad_specs_are_refused():
    for spec in ("poisson", "gamma:1", "poisson:-1", "burst:1", "gamma:1:0"):
        with pytest.raises(ValueError):
            Arrivals.parse(spec)
    for spec in ("zipf:1.1:5:2", "fixed:0", "uniform:3", "normal:1:2"):
        with pytest.raises(ValueError):
            length_sampler(spec)


def test_synthetic_is_seeded_and_resamples_pairs():
    src = read_trace("azure-conv")
    a = synthetic(Arrivals.parse("poisson:5"), 50, 7, lengths_from=src)
    b = synthetic(Arrivals.parse("poisson:5"), 50, 7, lengths_from=src)
    assert a.requests == b.requests
    pairs = {(r.prompt_tokens, r.output_tokens) for r in src.requests}
    assert all((r.prompt_tokens, r.output_tokens) in pairs for r in a.requests)


@pytest.fixture(scope="module")
def tiny_tok(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


@pytest.mark.parametrize("mode", ["text", "ids", "chat"])
def test_prompts_have_exact_token_counts(tiny_tok, mode):
    f = PromptFactory(tiny_tok, mode, seed=0)
    for i, n in enumerate([1 + f.overhead, 2 + f.overhead, 37, 500, 1999]):
        p = f.build(i, n)
        assert p.num_tokens == n
        assert f.count(p) == n, (mode, n)


def test_mooncake_prefix_sharing(tiny_tok):
    f = PromptFactory(tiny_tok, "ids", seed=0, block_tokens=16)
    a = f.build(0, 40, (1, 2, 3))
    b = f.build(1, 45, (1, 2, 9))
    c = f.build(2, 20, (1, 2))  # 20 tokens: block 1 whole, block 2's first 4 tokens
    assert a.ids[:32] == b.ids[:32]
    assert a.ids[32] != b.ids[32] or a.ids[32:40] != b.ids[32:40]
    assert c.ids == a.ids[:20]
    # Text prompts share the same prefix, character for character.
    ft = PromptFactory(tiny_tok, "text", seed=0, block_tokens=16)
    ta, tb = ft.build(0, 40, (1, 2, 3)), ft.build(1, 40, (1, 2, 4))
    assert tiny_tok.encode(ta.text)[:32] == tiny_tok.encode(tb.text)[:32]
    # Without block ids, two prompts share no leading token.
    u, v = ft.build(5, 30), ft.build(6, 30)
    assert u.text.split()[:3] != v.text.split()[:3]


def _trace(times, name="t", labels=None) -> Trace:
    reqs = [
        TraceRequest(t, 100 + i, 10 + i, labels=labels[i] if labels else ())
        for i, t in enumerate(times)
    ]
    return Trace(name, reqs)


def test_plan_scales_caps_and_warms_up():
    tr = _trace([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])  # 1 req/s
    f = PromptFactory()
    p = plan(tr, ReplayConfig(speedup=2.0), f)
    assert [x.at_s for x in p] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    p = plan(tr, ReplayConfig(rate=4.0, duration_s=1.0, warmup_s=0.5), f)
    assert [x.at_s for x in p] == [0.0, 0.25, 0.5, 0.75]  # arrivals before 1.0 s
    assert [x.warmup for x in p] == [True, True, False, False]
    p = plan(tr, ReplayConfig(max_requests=2, max_prompt_tokens=100, max_output_tokens=10), f)
    assert [(x.prompt.num_tokens, x.max_tokens) for x in p] == [(100, 10), (100, 10)]
    p = plan(tr, ReplayConfig(length_scale=0.5, max_requests=1), f)
    assert (p[0].prompt.num_tokens, p[0].max_tokens) == (50, 5)
    mc = read_trace("mooncake-conversation")
    assert block_tokens(mc, ReplayConfig(length_scale=1 / 32)) == 16


def test_rate_scales_the_replayed_head_not_the_whole_trace():
    # A sparse head (1 req/s for 5 requests) then a dense tail (10 req/s).
    tr = _trace([0, 1, 2, 3, 4] + [4 + 0.1 * k for k in range(1, 51)])
    f = PromptFactory()
    p = plan(tr, ReplayConfig(rate=2.0, max_requests=5), f)
    assert [x.at_s for x in p] == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0])
    # duration 2 s at 2 req/s holds the first 5 requests: the same head, the same scale.
    p = plan(tr, ReplayConfig(rate=2.0, duration_s=2.0), f)
    assert [x.at_s for x in p] == pytest.approx([0.0, 0.5, 1.0, 1.5])
    # The shipped Azure excerpt: its first 60 requests are sparser than its mean.
    az = read_trace("azure-conv")
    p = plan(az, ReplayConfig(rate=2.0, max_requests=60), f)
    assert (len(p) - 1) / p[-1].at_s == pytest.approx(2.0)
    with pytest.raises(ValueError, match="one instant"):
        plan(_trace([1.0, 1.0, 1.0, 2.0]), ReplayConfig(rate=2.0, max_requests=3), f)


def test_tenants_by_share_and_by_label():
    tr = _trace(list(np.arange(4000) * 0.01))
    cfg = ReplayConfig(tenants=(Tenant("a", "ka", 3), Tenant("b", "kb", 1)), seed=1)
    p = plan(tr, cfg, PromptFactory())
    share_a = sum(x.tenant == "a" for x in p) / len(p)
    assert share_a == pytest.approx(0.75, abs=0.03)
    assert {x.api_key for x in p if x.tenant == "b"} == {"kb"}
    labels = [(("model", "GPT-4" if i % 3 == 0 else "ChatGPT"),) for i in range(6)]
    tr = _trace([0, 1, 2, 3, 4, 5], labels=labels)
    cfg = ReplayConfig(tenants=(Tenant("GPT-4", "k4"), Tenant("ChatGPT", "k3")), tenant_by="model")
    assert [x.tenant for x in plan(tr, cfg, PromptFactory())] == [
        "GPT-4",
        "ChatGPT",
        "ChatGPT",
        "GPT-4",
        "ChatGPT",
        "ChatGPT",
    ]
    with pytest.raises(ValueError, match="no tenant named"):
        plan(tr, ReplayConfig(tenant_by="model"), PromptFactory())
    assert Tenant.parse("t=sk-1:0.5") == Tenant("t", "sk-1", 0.5)
    with pytest.raises(ValueError):
        Tenant.parse("t=k:zero")
