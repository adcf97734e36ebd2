"""Synthetic workloads: arrival processes and length distributions, seeded.

Arrivals (mean rate `rate` requests/s):
- `fixed`: one every 1/rate seconds;
- `poisson`: exponential gaps;
- `gamma`: gamma gaps with coefficient of variation `cv` (shape 1/cv², so cv = 1 is Poisson
  and cv > 1 is burstier), as BurstGPT models its arrivals;
- `onoff`: Poisson at `rate` during `on_s`-second bursts separated by `off_s` silent seconds
  (the mean rate is then rate * on_s / (on_s + off_s)).

Lengths: `fixed`, `uniform` (inclusive), `zipf` truncated to [lo, hi] with P(k) ∝ k^-a (BurstGPT
fits a = 1.1 to response lengths), or (prompt, output) pairs resampled from a trace.

Specs are strings so the CLI can take them as they are: `gamma:20:2`, `zipf:1.1:1:1024`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from loadgen.trace import Trace, TraceRequest


@dataclass(frozen=True)
class Arrivals:
    kind: str  # fixed | poisson | gamma | onoff
    rate: float
    cv: float = 1.0
    on_s: float = 1.0
    off_s: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in ("fixed", "poisson", "gamma", "onoff"):
            raise ValueError(f"unknown arrival process {self.kind!r}: fixed, poisson, gamma, onoff")
        if not self.rate > 0:
            raise ValueError(f"arrival rate must be > 0, got {self.rate}")
        if not self.cv > 0:
            raise ValueError(f"gamma cv must be > 0, got {self.cv}")
        if not (self.on_s > 0 and self.off_s >= 0):
            raise ValueError("on/off periods must be on > 0 and off >= 0 seconds")

    @classmethod
    def parse(cls, spec: str) -> Arrivals:
        """`fixed:RATE`, `poisson:RATE`, `gamma:RATE:CV`, `onoff:RATE:ON_S:OFF_S`."""
        kind, *args = spec.split(":")
        names = {
            "fixed": ("rate",),
            "poisson": ("rate",),
            "gamma": ("rate", "cv"),
            "onoff": ("rate", "on_s", "off_s"),
        }
        if kind not in names or len(args) != len(names[kind]):
            raise ValueError(
                f"bad arrivals {spec!r}: fixed:RATE, poisson:RATE, gamma:RATE:CV or "
                "onoff:RATE:ON_S:OFF_S"
            )
        try:
            return cls(kind, **{k: float(v) for k, v in zip(names[kind], args, strict=True)})
        except ValueError as e:
            raise ValueError(f"bad arrivals {spec!r}: {e}") from None

    @property
    def mean_rate(self) -> float:
        if self.kind == "onoff":
            return self.rate * self.on_s / (self.on_s + self.off_s)
        return self.rate

    def with_rate(self, mean_rate: float) -> Arrivals:
        """The same process shape at another mean rate (what goodput bisection varies)."""
        return Arrivals(
            self.kind, self.rate * mean_rate / self.mean_rate, self.cv, self.on_s, self.off_s
        )

    def times(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """n arrival times in seconds; the first is 0."""
        if n <= 0:
            return np.zeros(0)
        if self.kind == "fixed":
            return np.arange(n) / self.rate
        if self.kind == "gamma":
            shape = 1.0 / self.cv**2
            gaps = rng.gamma(shape, 1.0 / (self.rate * shape), n - 1)
        else:
            gaps = rng.exponential(1.0 / self.rate, n - 1)
        t = np.concatenate(([0.0], np.cumsum(gaps)))
        if self.kind == "onoff":
            # Busy time maps onto the wall clock: every completed on-period adds an off-period.
            t = t + np.floor(t / self.on_s) * self.off_s
        return t


Sampler = Callable[[int, np.random.Generator], np.ndarray]


def length_sampler(spec: str) -> Sampler:
    """`fixed:N`, `uniform:LO:HI` or `zipf:A:LO:HI` -> f(n, rng) giving n lengths >= 1."""
    kind, *args = spec.split(":")
    try:
        nums = [float(a) for a in args]
    except ValueError:
        raise ValueError(f"bad length spec {spec!r}: numbers expected") from None
    if kind == "fixed" and len(nums) == 1 and nums[0] >= 1:
        n0 = int(nums[0])
        return lambda n, rng: np.full(n, n0, dtype=np.int64)
    if kind == "uniform" and len(nums) == 2 and 1 <= nums[0] <= nums[1]:
        lo, hi = int(nums[0]), int(nums[1])
        return lambda n, rng: rng.integers(lo, hi + 1, n)
    if kind == "zipf" and len(nums) == 3 and nums[0] > 0 and 1 <= nums[1] <= nums[2]:
        a, lo, hi = nums[0], int(nums[1]), int(nums[2])
        support = np.arange(lo, hi + 1)
        cdf = np.cumsum(support.astype(float) ** -a)
        cdf /= cdf[-1]
        return lambda n, rng: support[np.searchsorted(cdf, rng.random(n), side="right")]
    raise ValueError(
        f"bad length spec {spec!r}: fixed:N, uniform:LO:HI or zipf:A:LO:HI (1 <= LO <= HI)"
    )


def synthetic(
    arrivals: Arrivals,
    n: int,
    seed: int,
    prompt_len: Sampler | None = None,
    output_len: Sampler | None = None,
    lengths_from: Trace | None = None,
) -> Trace:
    """n requests: arrival times from `arrivals`, lengths from the samplers or resampled as
    (prompt, output) pairs from `lengths_from` (keeping their joint distribution)."""
    rng = np.random.default_rng(seed)
    times = arrivals.times(n, rng)
    if lengths_from is not None:
        pick = rng.integers(0, len(lengths_from), n)
        src = lengths_from.requests
        pairs = [(src[i].prompt_tokens, src[i].output_tokens) for i in pick]
    else:
        if prompt_len is None or output_len is None:
            raise ValueError("give prompt and output length samplers, or a trace to resample")
        pairs = list(zip(prompt_len(n, rng).tolist(), output_len(n, rng).tolist(), strict=True))
    reqs = [TraceRequest(float(t), int(p), int(o)) for t, (p, o) in zip(times, pairs, strict=True)]
    src = f"lengths from {lengths_from.name}" if lengths_from is not None else "parametric"
    name = f"{arrivals.kind}@{arrivals.mean_rate:g}"
    return Trace(name, reqs, 0, f"synthetic:{name} seed={seed} {src}")
