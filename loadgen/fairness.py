"""Service each tenant received over time, and the gap between tenants (VTC's measure).

Service is VTC's weighted token count: `input_weight` per prompt token, credited when the first
token arrives (the prefill is done), plus `output_weight` per output token, credited as the
pieces arrive (a request's output tokens spread evenly over its pieces). VTC's defaults are 1
and 2: an output token costs about twice a prompt token.

The windowed gap: time is cut into windows; in each window, among the tenants that were
backlogged the whole window (at least one request in flight at every instant), the gap is the
largest minus the smallest service received in that window. A tenant that sends little is not
owed more than it asks for, so only backlogged ones count.

VTC's gap (`service_gap`): for two tenants f and g, the largest |W_f(t1, t2) - W_g(t1, t2)|
over every interval [t1, t2] in which both were backlogged, W being service over the tenant's
weight (its share); over all pairs. VTC bounds it by 2U, U = max(w_in * L_input, w_out * M),
L_input the longest prompt and M the tokens the serving pool holds at once (the client cannot
know M: the report takes it, `pool_tokens`). Backlogged, as VTC means it, is having requests
waiting in the queue; the client's nearest view of that is a request sent whose first token
has not come (queued, or in its prefill): so here a tenant is backlogged while it has one. (A
tenant whose requests are all generating is served as much as it asks: it is not owed more.)

Jain's index of x_1..x_n is (sum x)^2 / (n sum x^2): 1 when all are equal, 1/n when one tenant
gets everything. It is taken over each tenant's service over its weight, over the whole run
and over the time when every tenant was backlogged.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from loadgen.outcome import Outcome


def _service_events(o: Outcome, w_in: float, w_out: float) -> list[tuple[float, float]]:
    if not o.ok:
        return []
    ev = [(o.first_token, w_in * o.prompt_tokens)]
    if o.chunk_times and o.output_tokens:
        each = w_out * o.output_tokens / len(o.chunk_times)
        ev.extend((t, each) for t in o.chunk_times)
    return ev


def _busy_intervals(outs: Sequence[Outcome]) -> list[tuple[float, float]]:
    """Union of [sent, end] of a tenant's requests, merged."""
    return _merge(
        [(o.sent, o.end) for o in outs if not math.isnan(o.sent) and not math.isnan(o.end)]
    )


def _waiting_intervals(outs: Sequence[Outcome]) -> list[tuple[float, float]]:
    """Union of [sent, first token] of a tenant's requests (a request that failed before its
    first token: [sent, end] when it has an end), merged."""
    spans = []
    for o in outs:
        stop = o.first_token if not math.isnan(o.first_token) else o.end
        if not math.isnan(o.sent) and not math.isnan(stop):
            spans.append((o.sent, stop))
    return _merge(spans)


def _merge(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def _covers(intervals: list[tuple[float, float]], a: float, b: float) -> bool:
    return any(x <= a and b <= y for x, y in intervals)


def tenant_service(
    outcomes: Sequence[Outcome],
    t0: float,
    window_s: float,
    input_weight: float = 1.0,
    output_weight: float = 2.0,
) -> dict:
    """Per-tenant cumulative service at each window's end (seconds from t0), and gap stats."""
    measured = [o for o in outcomes if not o.warmup]
    tenants = sorted({o.tenant for o in measured})
    if not measured or window_s <= 0:
        return {"window_s": window_s, "t": [], "service": {}, "gap": None}
    start = min(o.sent for o in measured if not math.isnan(o.sent)) - t0
    ends = [o.end for o in measured if not math.isnan(o.end)]
    stop = (max(ends) if ends else t0) - t0
    edges = np.arange(start, stop + window_s, window_s)
    if edges.size < 2:
        edges = np.array([start, start + window_s])
    per_window: dict[str, np.ndarray] = {}
    busy: dict[str, list[tuple[float, float]]] = {}
    for name in tenants:
        mine = [o for o in measured if o.tenant == name]
        ev = [e for o in mine for e in _service_events(o, input_weight, output_weight)]
        times = np.array([t - t0 for t, _ in ev])
        amounts = np.array([a for _, a in ev])
        hist, _ = np.histogram(times, bins=edges, weights=amounts)
        per_window[name] = hist
        busy[name] = [(a - t0, b - t0) for a, b in _busy_intervals(mine)]
    gaps = []
    for k in range(edges.size - 1):
        a, b = edges[k], edges[k + 1]
        backlogged = [n for n in tenants if _covers(busy[n], a, b)]
        if len(backlogged) >= 2:
            vals = [per_window[n][k] for n in backlogged]
            gaps.append((float(a), max(vals) - min(vals), backlogged))
    total = {n: float(per_window[n].sum()) for n in tenants}
    return {
        "window_s": window_s,
        "weights": {"input": input_weight, "output": output_weight},
        "t": [float(x) for x in edges[1:]],
        "service": {n: np.cumsum(per_window[n]).tolist() for n in tenants},
        "total": total,
        "gap": {
            "windows_compared": len(gaps),
            "max": max((g for _, g, _ in gaps), default=None),
            "mean": float(np.mean([g for _, g, _ in gaps])) if gaps else None,
            "max_at_s": max(gaps, key=lambda x: x[1])[0] if gaps else None,
        },
    }


def timeline(outcomes: Sequence[Outcome], t0: float, window_s: float) -> dict:
    """Completed requests and output tokens per second in each window (all requests, warm-up
    included, so the plot shows the ramp)."""
    ends = [o.end - t0 for o in outcomes if o.ok]
    if not ends or window_s <= 0:
        return {"window_s": window_s, "t": [], "requests_per_s": [], "output_tokens_per_s": []}
    edges = np.arange(0.0, max(ends) + window_s, window_s)
    if edges.size < 2:
        edges = np.array([0.0, window_s])
    done, _ = np.histogram(ends, bins=edges)
    tok_t = [t - t0 for o in outcomes if o.ok for t in o.chunk_times]
    tok_w = [o.output_tokens / len(o.chunk_times) for o in outcomes if o.ok for _ in o.chunk_times]
    toks, _ = np.histogram(tok_t, bins=edges, weights=tok_w)
    return {
        "window_s": window_s,
        "t": [float(x) for x in edges[1:]],
        "requests_per_s": (done / window_s).tolist(),
        "output_tokens_per_s": (toks / window_s).tolist(),
    }


# -- VTC's gap, Jain's index, latency tails ---------------------------------------------------


@dataclass(frozen=True)
class FairSpec:
    """How service is counted (the router's fairness section: input_weight, output_weight,
    weights) and the pool size that gives U."""

    input_weight: float = 1.0
    output_weight: float = 2.0
    weights: Mapping[str, float] = field(default_factory=dict)
    pool_tokens: int | None = None  # M: tokens the serving pool holds at once

    def __post_init__(self) -> None:
        if not (self.input_weight > 0 and self.output_weight > 0):
            raise ValueError("service weights must be > 0")
        for name, w in self.weights.items():
            if not w > 0:
                raise ValueError(f"tenant {name}: a weight must be > 0, got {w}")
        if self.pool_tokens is not None and self.pool_tokens < 1:
            raise ValueError(f"pool tokens must be >= 1, got {self.pool_tokens}")

    def weight(self, tenant: str) -> float:
        return self.weights.get(tenant, 1.0)


def _intersect(a: list[tuple[float, float]], b: list[tuple[float, float]]):
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if hi > lo:
            out.append((lo, hi))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def _events(outs: Sequence[Outcome], spec: FairSpec, tenant: str) -> tuple[np.ndarray, np.ndarray]:
    ev = [e for o in outs for e in _service_events(o, spec.input_weight, spec.output_weight)]
    ev.sort()
    w = spec.weight(tenant)
    return np.array([t for t, _ in ev]), np.array([a / w for _, a in ev])


def _interval_gap(ta, aa, tb, ab, lo: float, hi: float) -> float:
    """max over [t1, t2] within [lo, hi] of |W_a - W_b|: the range of the running difference
    (events at one instant are taken together)."""
    ia = slice(np.searchsorted(ta, lo, "left"), np.searchsorted(ta, hi, "right"))
    ib = slice(np.searchsorted(tb, lo, "left"), np.searchsorted(tb, hi, "right"))
    t = np.concatenate((ta[ia], tb[ib]))
    if t.size == 0:
        return 0.0
    d = np.concatenate((aa[ia], -ab[ib]))
    uniq, inv = np.unique(t, return_inverse=True)
    run = np.concatenate(([0.0], np.cumsum(np.bincount(inv, weights=d, minlength=uniq.size))))
    return float(run.max() - run.min())


def jain(xs: Sequence[float]) -> float | None:
    x = np.asarray(xs, dtype=float)
    if x.size == 0 or not np.any(x):
        return None
    return float(x.sum() ** 2 / (x.size * np.square(x).sum()))


def service_gap(outcomes: Sequence[Outcome], t0: float, spec: FairSpec) -> dict:
    """VTC's gap over every pair of tenants, U and the gap over U (when pool_tokens is given),
    and Jain's index of the service over the weights."""
    measured = [o for o in outcomes if not o.warmup]
    tenants = sorted({o.tenant for o in measured})
    busy = {n: _waiting_intervals([o for o in measured if o.tenant == n]) for n in tenants}
    ev = {n: _events([o for o in measured if o.tenant == n], spec, n) for n in tenants}
    worst, where = None, None
    for i, f in enumerate(tenants):
        for g in tenants[i + 1 :]:
            for lo, hi in _intersect(busy[f], busy[g]):
                gap = _interval_gap(*ev[f], *ev[g], lo, hi)
                if worst is None or gap > worst:
                    worst, where = gap, {"tenants": [f, g], "from_s": lo - t0, "to_s": hi - t0}
    # Every tenant backlogged at once: the intervals all of them share.
    common = busy[tenants[0]] if tenants else []
    for n in tenants[1:]:
        common = _intersect(common, busy[n])
    during = {}
    for n in tenants:
        t, a = ev[n]
        during[n] = sum(
            float(a[np.searchsorted(t, lo, "left") : np.searchsorted(t, hi, "right")].sum())
            for lo, hi in common
        )
    longest = max((o.prompt_tokens for o in measured if o.ok), default=0)
    u = None
    if spec.pool_tokens is not None:
        u = max(spec.input_weight * longest, spec.output_weight * spec.pool_tokens)
    total = {n: float(ev[n][1].sum()) for n in tenants}
    return {
        "weights": {n: spec.weight(n) for n in tenants},
        "service_over_weight": total,
        "max_gap": worst,
        "max_gap_between": where,
        "longest_prompt": longest,
        "pool_tokens": spec.pool_tokens,
        "u": u,
        "max_gap_over_u": worst / u if (u and worst is not None) else None,
        "within_2u": (worst <= 2 * u) if (u and worst is not None) else None,
        "jain": jain(list(total.values())) if len(tenants) > 1 else None,
        "all_backlogged_s": sum(hi - lo for lo, hi in common) if len(tenants) > 1 else 0.0,
        "jain_all_backlogged": jain(list(during.values())) if len(tenants) > 1 else None,
    }


TAILS = (50, 99, 99.9)


def _tails(xs: Sequence[float]) -> dict:
    a = np.asarray([x for x in xs if not math.isnan(x)], dtype=float)
    keys = [f"p{q:g}".replace(".", "") for q in TAILS]  # p50, p99, p999
    if a.size == 0:
        return {"count": 0, **dict.fromkeys(keys)}
    return {"count": int(a.size), **dict(zip(keys, np.percentile(a, TAILS).tolist(), strict=True))}


def latency_tails(outcomes: Sequence[Outcome]) -> dict:
    """TTFT and TBT (the gaps between a request's token pieces) at p50, p99 and p99.9: over
    all measured requests, per tenant, and per priority when requests carried one."""
    ok = [o for o in outcomes if not o.warmup and o.ok]

    def of(group: Sequence[Outcome]) -> dict:
        tbt = [b - a for o in group for a, b in itertools.pairwise(o.chunk_times)]
        return {"ttft_s": _tails([o.ttft for o in group]), "tbt_s": _tails(tbt)}

    names = sorted({o.tenant for o in ok})
    out = {"all": of(ok), "tenants": {n: of([o for o in ok if o.tenant == n]) for n in names}}
    prios = sorted({o.priority for o in ok if o.priority is not None})
    if prios:
        out["priorities"] = {str(p): of([o for o in ok if o.priority == p]) for p in prios}
    return out


def fairness_report(
    outcomes: Sequence[Outcome], t0: float, window_s: float, spec: FairSpec | None = None
) -> dict:
    """The report's fairness section: service over time (windowed, with the windowed gap),
    VTC's gap against 2U, Jain's index, and latency tails."""
    spec = spec or FairSpec()
    out = tenant_service(outcomes, t0, window_s, spec.input_weight, spec.output_weight)
    out["vtc"] = service_gap(outcomes, t0, spec)
    out["tails"] = latency_tails(outcomes)
    return out
