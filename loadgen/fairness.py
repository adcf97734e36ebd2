"""Service each tenant received over time, and the gap between tenants (VTC's measure).

Service is VTC's weighted token count: `input_weight` per prompt token, credited when the first
token arrives (the prefill is done), plus `output_weight` per output token, credited as the
pieces arrive (a request's output tokens spread evenly over its pieces). VTC's defaults are 1
and 2: an output token costs about twice a prompt token.

The gap: time is cut into windows; in each window, among the tenants that were backlogged the
whole window (at least one request in flight at every instant), the gap is the largest minus
the smallest service received in that window. VTC bounds exactly this for backlogged tenants;
a tenant that sends little is not owed more than it asks for, so only backlogged ones count.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

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
    spans = sorted(
        (o.sent, o.end if not math.isnan(o.end) else math.inf)
        for o in outs
        if not math.isnan(o.sent)
    )
    merged: list[tuple[float, float]] = []
    for a, b in spans:
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
