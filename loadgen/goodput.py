"""Goodput (DistServe): the highest request rate at which at least a target share of requests
meets both the TTFT and the TPOT SLO, found by bisection over the rate.

Each probed rate is run `repeats` times; it passes when the mean attainment (both SLOs) over
those runs reaches the target. The search assumes attainment falls as the rate rises. It first
brackets the answer (halving a failing lower end, doubling a passing upper end), then bisects
until the bracket is within `rel_tol` of its upper end; the answer is the bracket's lower end:
the highest rate seen to pass.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

# measure(rate, repeat) -> a run's summary (metrics.summarize, with attainment)
Measure = Callable[[float, int], Awaitable[dict]]


@dataclass
class Probe:
    rate: float
    summaries: list[dict] = field(default_factory=list)

    @property
    def attainments(self) -> list[float]:
        return [s["attainment"]["both"] or 0.0 for s in self.summaries]

    @property
    def attainment(self) -> float:
        a = self.attainments
        return sum(a) / len(a) if a else 0.0


@dataclass
class GoodputResult:
    goodput_rps: float  # 0.0 when even the lowest rate tried failed
    bracket: tuple[float, float]
    target: float
    probes: list[Probe]
    converged: bool

    @property
    def best(self) -> Probe | None:
        """The probe at the goodput rate (the highest that passed)."""
        passed = [p for p in self.probes if p.attainment >= self.target]
        return max(passed, key=lambda p: p.rate) if passed else None


async def search(
    measure: Measure,
    target: float,
    lo: float,
    hi: float,
    repeats: int = 2,
    rel_tol: float = 0.05,
    max_probes: int = 16,
    on_probe: Callable[[Probe], None] | None = None,
) -> GoodputResult:
    if not 0 < lo < hi:
        raise ValueError(f"need 0 < low rate < high rate, got {lo} and {hi}")
    if repeats < 1 or not 0 < rel_tol < 1:
        raise ValueError("repeats must be >= 1 and rel_tol in (0, 1)")
    probes: list[Probe] = []

    async def passes(rate: float) -> bool:
        p = Probe(rate)
        for k in range(repeats):
            p.summaries.append(await measure(rate, k))
        probes.append(p)
        if on_probe is not None:
            on_probe(p)
        return p.attainment >= target

    floor = lo / 64  # below this, call it zero rather than search forever
    while not await passes(lo):
        hi, lo = lo, lo / 2
        if lo < floor or len(probes) >= max_probes:
            return GoodputResult(0.0, (0.0, hi), target, probes, False)
    while await passes(hi):
        lo, hi = hi, hi * 2
        if len(probes) >= max_probes:
            return GoodputResult(lo, (lo, hi), target, probes, False)
    while (hi - lo) / hi > rel_tol:
        if len(probes) >= max_probes:
            return GoodputResult(lo, (lo, hi), target, probes, False)
        mid = (lo + hi) / 2
        if await passes(mid):
            lo = mid
        else:
            hi = mid
    return GoodputResult(lo, (lo, hi), target, probes, True)
