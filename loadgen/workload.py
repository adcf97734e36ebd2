"""From a trace to the planned requests of one run: time scaling, caps, warm-up, tenants and
prompts.

Time: a trace's arrivals are divided by `speedup`; `rate` instead picks the factor that gives
that mean rate over the requests the run replays (a trace's head can be sparser or denser than
the whole: the Azure conversation excerpt's first 60 requests arrive at 1.95 req/s, all 1,000 at
4.6), so `--rate 2 --requests 60` sends 60 requests over 29.5 s. A run keeps the requests that
arrive before `duration_s` and at most `max_requests` of them. Requests arriving before
`warmup_s` are sent like any other but left out of the results, so caches and queues have
filled when measurement starts.

Tenants: `name=KEY:SHARE` each. Requests go to tenants at random in proportion to their shares
(seeded), or, with `tenant_by=LABEL`, by a trace label (BurstGPT's `model` or `log_type`): the
tenant whose name equals the row's label value gets it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from loadgen.prompts import Prompt, PromptFactory
from loadgen.trace import Trace


@dataclass(frozen=True)
class Tenant:
    name: str
    api_key: str = ""
    share: float = 1.0

    @classmethod
    def parse(cls, spec: str) -> Tenant:
        """`NAME=KEY[:SHARE]` or `NAME` (no key)."""
        name, _, rest = spec.partition("=")
        key, share = rest, 1.0
        if ":" in rest:
            key, _, s = rest.rpartition(":")
            try:
                share = float(s)
            except ValueError:
                raise ValueError(f"bad tenant {spec!r}: SHARE must be a number") from None
        if not name or not share > 0:
            raise ValueError(f"bad tenant {spec!r}: NAME=KEY[:SHARE] with SHARE > 0")
        return cls(name, key, share)


@dataclass(frozen=True)
class ReplayConfig:
    speedup: float = 1.0
    rate: float | None = None  # target mean requests/s; overrides speedup
    duration_s: float | None = None
    max_requests: int | None = None
    warmup_s: float = 0.0
    max_prompt_tokens: int | None = None
    max_output_tokens: int | None = None
    # Multiplies every length (and Mooncake's block size) so a long-context trace fits a small
    # model while keeping its shape and prefix sharing.
    length_scale: float = 1.0
    tenants: tuple[Tenant, ...] = (Tenant("default"),)
    tenant_by: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.speedup > 0:
            raise ValueError(f"--speedup must be > 0, got {self.speedup}")
        if self.rate is not None and not self.rate > 0:
            raise ValueError(f"--rate must be > 0, got {self.rate}")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValueError(f"--duration must be > 0, got {self.duration_s}")
        if self.max_requests is not None and self.max_requests < 1:
            raise ValueError(f"--requests must be >= 1, got {self.max_requests}")
        if self.warmup_s < 0:
            raise ValueError(f"--warmup must be >= 0, got {self.warmup_s}")
        if not self.length_scale > 0:
            raise ValueError(f"--length-scale must be > 0, got {self.length_scale}")
        if not self.tenants:
            raise ValueError("at least one tenant")
        if len({t.name for t in self.tenants}) != len(self.tenants):
            raise ValueError("tenant names must be distinct")


@dataclass(frozen=True, slots=True)
class Planned:
    index: int
    at_s: float  # send time, seconds from the run's start
    prompt: Prompt
    max_tokens: int
    tenant: str
    api_key: str
    warmup: bool


def time_factor(trace: Trace, cfg: ReplayConfig) -> float:
    """What trace seconds are divided by: `speedup`, or the factor that brings the replayed
    head of the trace to `rate` ((n - 1) gaps over its span, as `Trace.mean_rate`). At `rate`,
    `duration_s` holds about `rate * duration_s + 1` requests; the caps choose that head."""
    if cfg.rate is None:
        return cfg.speedup
    n = len(trace)
    if cfg.duration_s is not None:
        n = min(n, math.floor(cfg.rate * cfg.duration_s) + 1)
    if cfg.max_requests is not None:
        n = min(n, cfg.max_requests)
    head = trace.head(max(n, 2))
    if not math.isfinite(head.mean_rate):
        raise ValueError(
            f"trace {trace.name}: its first {len(head)} requests arrive at one instant, "
            "so --rate cannot scale them"
        )
    return cfg.rate / head.mean_rate


def plan(trace: Trace, cfg: ReplayConfig, prompts: PromptFactory) -> list[Planned]:
    factor = time_factor(trace, cfg)
    reqs = trace.requests
    times = np.fromiter((r.arrival_s for r in reqs), float, len(reqs)) / factor
    n = len(reqs)
    if cfg.duration_s is not None:
        n = int(np.searchsorted(times, cfg.duration_s, side="left"))
    if cfg.max_requests is not None:
        n = min(n, cfg.max_requests)
    tenant_of = _assign(trace, cfg, n)
    by_name = {t.name: t for t in cfg.tenants}
    s = cfg.length_scale
    out = []
    for i in range(n):
        r = reqs[i]
        p = max(1, round(r.prompt_tokens * s))
        o = max(1, round(r.output_tokens * s))
        if cfg.max_prompt_tokens is not None:
            p = min(p, cfg.max_prompt_tokens)
        if cfg.max_output_tokens is not None:
            o = min(o, cfg.max_output_tokens)
        t = by_name[tenant_of[i]]
        at = float(times[i])
        prompt = prompts.build(i, p, r.hash_ids)
        out.append(Planned(i, at, prompt, o, t.name, t.api_key, at < cfg.warmup_s))
    return out


def _assign(trace: Trace, cfg: ReplayConfig, n: int) -> Sequence[str]:
    names = [t.name for t in cfg.tenants]
    if cfg.tenant_by is not None:
        out = []
        for i in range(n):
            v = trace.requests[i].label(cfg.tenant_by)
            if v is None:
                raise ValueError(f"trace {trace.name} has no label {cfg.tenant_by!r}")
            if v not in names:
                raise ValueError(
                    f"no tenant named {v!r} (label {cfg.tenant_by} of request {i}); "
                    f"tenants: {', '.join(names)}"
                )
            out.append(v)
        return out
    if len(names) == 1:
        return names * n
    shares = np.array([t.share for t in cfg.tenants])
    rng = np.random.default_rng([cfg.seed, 4])
    return [names[k] for k in rng.choice(len(names), n, p=shares / shares.sum())]


def block_tokens(trace: Trace, cfg: ReplayConfig) -> int:
    """The prefix-block size after length scaling (0: the trace has no block ids)."""
    return max(1, round(trace.block_tokens * cfg.length_scale)) if trace.block_tokens else 0
