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
tenant whose name equals the row's label value gets it. `name=KEY:SHARE@ON:OFF` makes a tenant
on/off: it sends during ON-second periods separated by OFF silent seconds (on first), and its
requests that fall in an off period are not sent (the others' load is unchanged); the caps
then count the requests that remain.

Sessions (loadgen.sessions): each request starts a multi-turn conversation; its later turns
follow the previous turn's answer. Priorities (loadgen.churn): each request carries an engine
priority drawn at send time from a churn pattern.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from loadgen.churn import PriorityChurn
from loadgen.prompts import Prompt, PromptFactory
from loadgen.sessions import BLOCK_TOKENS, Sessions, block_ids, conversations
from loadgen.trace import Trace


@dataclass(frozen=True)
class Tenant:
    name: str
    api_key: str = ""
    share: float = 1.0
    on_s: float | None = None  # on/off: sends only during on periods
    off_s: float = 0.0

    def __post_init__(self) -> None:
        if self.on_s is not None and not (self.on_s > 0 and self.off_s >= 0):
            raise ValueError(f"tenant {self.name}: on/off periods must be ON > 0 and OFF >= 0")

    def sends_at(self, t: float) -> bool:
        return self.on_s is None or (t % (self.on_s + self.off_s)) < self.on_s

    @classmethod
    def parse(cls, spec: str) -> Tenant:
        """`NAME=KEY[:SHARE][@ON_S:OFF_S]` or `NAME` (no key)."""
        on_s, off_s = None, 0.0
        head, at, gate = spec.rpartition("@")
        if at and gate.count(":") == 1:
            try:
                on_s, off_s = (float(x) for x in gate.split(":"))
            except ValueError:
                raise ValueError(f"bad tenant {spec!r}: @ON_S:OFF_S must be numbers") from None
            spec = head
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
        return cls(name, key, share, on_s, off_s)


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
    sessions: Sessions | None = None
    priorities: PriorityChurn | None = None

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
    # A later turn of a conversation: sent think_s after request `follows` ends (its at_s is
    # the conversation's start).
    follows: int | None = None
    think_s: float = 0.0
    session: int | None = None
    priority: int | None = None  # set at send time from ReplayConfig.priorities

    @property
    def stream(self) -> int:
        """What keeps one priority between churn updates: the conversation, else the request."""
        return self.session if self.session is not None else self.index


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
    by_name = {t.name: t for t in cfg.tenants}
    if any(t.on_s is not None for t in cfg.tenants):
        # On/off tenants: drop what they would send while off, then cap what remains.
        assigned = _assign(trace, cfg, n)
        rows = [i for i in range(n) if by_name[assigned[i]].sends_at(float(times[i]))]
        if cfg.max_requests is not None:
            rows = rows[: cfg.max_requests]
        tenant_of = {i: assigned[i] for i in rows}
    else:
        if cfg.max_requests is not None:
            n = min(n, cfg.max_requests)
        rows = list(range(n))
        tenant_of = dict(enumerate(_assign(trace, cfg, n)))
    s = cfg.length_scale
    lengths = []
    for i in rows:
        r = reqs[i]
        p = max(1, round(r.prompt_tokens * s))
        o = max(1, round(r.output_tokens * s))
        if cfg.max_prompt_tokens is not None:
            p = min(p, cfg.max_prompt_tokens)
        if cfg.max_output_tokens is not None:
            o = min(o, cfg.max_output_tokens)
        lengths.append((p, o))
    if cfg.sessions is not None:
        return _plan_sessions(trace, cfg, prompts, rows, times, lengths, tenant_of)
    out = []
    for k, i in enumerate(rows):
        t = by_name[tenant_of[i]]
        at = float(times[i])
        prompt = prompts.build(k, lengths[k][0], reqs[i].hash_ids)
        out.append(Planned(k, at, prompt, lengths[k][1], t.name, t.api_key, at < cfg.warmup_s))
    return out


def _plan_sessions(trace, cfg, prompts, rows, times, lengths, tenant_of) -> list[Planned]:
    """Every kept request starts a conversation; its later turns come after all the starts in
    the list (replay sends them as their previous turns end)."""
    if trace.block_tokens:
        raise ValueError(
            f"trace {trace.name} has its own prefix blocks: sessions build their own prefixes "
            "(replay it without --sessions, or use an Azure, BurstGPT or synthetic workload)"
        )
    if prompts.block_tokens != BLOCK_TOKENS:
        raise ValueError(
            f"sessions need a prompt factory with block_tokens={BLOCK_TOKENS} "
            f"(got {prompts.block_tokens})"
        )
    by_name = {t.name: t for t in cfg.tenants}
    convs = conversations(lengths, cfg.sessions, cfg.seed, cfg.max_prompt_tokens)
    starts, later = [], []
    index = len(rows)
    for c, turns in enumerate(convs):
        i = rows[c]
        t = by_name[tenant_of[i]]
        at = float(times[i])
        prev = c
        for turn in turns:
            k = c if turn.turn == 0 else index
            prompt = prompts.build(k, turn.prompt_tokens, block_ids(c, turn.prompt_tokens))
            p = Planned(
                k, at, prompt, turn.output_tokens, t.name, t.api_key, at < cfg.warmup_s,
                follows=None if turn.turn == 0 else prev,
                think_s=cfg.sessions.think_s, session=c,
            )  # fmt: skip
            if turn.turn == 0:
                starts.append(p)
            else:
                later.append(p)
                index += 1
            prev = k
    return starts + later


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
    """The prefix-block size after length scaling (0: the trace has no block ids); sessions
    use their own blocks."""
    if cfg.sessions is not None:
        return BLOCK_TOKENS
    return max(1, round(trace.block_tokens * cfg.length_scale)) if trace.block_tokens else 0
