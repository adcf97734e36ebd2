"""Latency, throughput and SLO attainment of one run.

Definitions (all from the client's side, in seconds):
- TTFT: first token piece's arrival - send time.
- ITL: gaps between successive token pieces of one request (pooled over requests).
- TPOT (DistServe): (e2e - TTFT) / (output tokens - 1); undefined for one-token answers, which
  then meet any TPOT SLO (they have no decode phase).
- e2e: last byte - send time.
- Throughput: over the measurement window, from the first measured send to the last measured
  end: completed requests/s, and prompt and output tokens/s of completed requests.
- Attainment: the share of measured requests (warm-up excluded, failures included as misses)
  whose TTFT, TPOT, or both are within the SLO.

Percentiles interpolate linearly between order statistics (numpy's default).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from loadgen.outcome import Outcome

QUANTILES = (50, 90, 95, 99)


@dataclass(frozen=True)
class SLO:
    ttft_s: float
    tpot_s: float
    attainment: float = 0.9  # the share that must meet both for a rate to count as goodput

    def __post_init__(self) -> None:
        if not (self.ttft_s > 0 and self.tpot_s > 0):
            raise ValueError("SLO targets must be > 0 seconds")
        if not 0 < self.attainment <= 1:
            raise ValueError(f"attainment target must be in (0, 1], got {self.attainment}")

    def meets_ttft(self, o: Outcome) -> bool:
        return o.ok and o.ttft <= self.ttft_s

    def meets_tpot(self, o: Outcome) -> bool:
        return o.ok and (math.isnan(o.tpot) or o.tpot <= self.tpot_s)


def distribution(xs: Iterable[float]) -> dict[str, float | int | None]:
    a = np.asarray([x for x in xs if not math.isnan(x)], dtype=float)
    if a.size == 0:
        return {"count": 0, "mean": None, **{f"p{q}": None for q in QUANTILES}, "max": None}
    qs = np.percentile(a, QUANTILES)
    return {
        "count": int(a.size),
        "mean": float(a.mean()),
        **{f"p{q}": float(v) for q, v in zip(QUANTILES, qs, strict=True)},
        "max": float(a.max()),
    }


def inter_token_latencies(outcomes: Iterable[Outcome]) -> list[float]:
    gaps: list[float] = []
    for o in outcomes:
        c = o.chunk_times
        gaps.extend(b - a for a, b in itertools.pairwise(c))
    return gaps


def attainment(outcomes: Sequence[Outcome], slo: SLO) -> dict[str, float | None]:
    n = len(outcomes)
    if n == 0:
        return {"ttft": None, "tpot": None, "both": None}
    t = [slo.meets_ttft(o) for o in outcomes]
    p = [slo.meets_tpot(o) for o in outcomes]
    return {
        "ttft": sum(t) / n,
        "tpot": sum(p) / n,
        "both": sum(a and b for a, b in zip(t, p, strict=True)) / n,
    }


def summarize(outcomes: Sequence[Outcome], slo: SLO | None = None) -> dict:
    """The run's figures over its measured (non-warm-up) requests; send lag over all."""
    measured = [o for o in outcomes if not o.warmup]
    ok = [o for o in measured if o.ok]
    errors: dict[str, int] = {}
    for o in measured:
        if o.error is not None:
            key = o.error.split(":", 1)[0][:60]
            errors[key] = errors.get(key, 0) + 1
    if ok:
        start = min(o.sent for o in measured if not math.isnan(o.sent))
        window = max(o.end for o in ok) - start
    else:
        window = 0.0
    per_s = (lambda x: x / window) if window > 0 else (lambda x: None)
    out_tokens = sum(o.output_tokens for o in ok)
    prompt_tokens = sum(o.prompt_tokens for o in ok)
    s = {
        "requests": len(outcomes),
        "measured": len(measured),
        "completed": len(ok),
        "failed": len(measured) - len(ok),
        "errors": errors,
        "window_s": window,
        "throughput": {
            "requests_per_s": per_s(len(ok)),
            "output_tokens_per_s": per_s(out_tokens),
            "prompt_tokens_per_s": per_s(prompt_tokens),
            "total_tokens_per_s": per_s(out_tokens + prompt_tokens),
        },
        "prompt_tokens": prompt_tokens,
        "output_tokens": out_tokens,
        "ttft_s": distribution(o.ttft for o in ok),
        "tpot_s": distribution(o.tpot for o in ok),
        "itl_s": distribution(inter_token_latencies(ok)),
        "e2e_s": distribution(o.e2e for o in ok),
        "send_lag_s": distribution(o.send_lag for o in outcomes),
        # Prompts the server counted differently from the plan (tokenizer or template mismatch).
        "prompt_token_mismatches": sum(o.prompt_tokens != o.planned_prompt_tokens for o in ok),
    }
    if slo is not None:
        s["slo"] = {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s, "target": slo.attainment}
        s["attainment"] = attainment(measured, slo)
    return s
