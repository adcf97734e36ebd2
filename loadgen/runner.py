"""One benchmark as a library call: a target, a workload, and how to run it at a given rate.

`Workload` is either a trace (scaled to a rate by dividing its times) or a synthetic arrival
process (regenerated at the rate, with a fresh seed per repeat); `Target` makes the client.
The CLI and `bench/loadgen.py` are thin shells over these.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from loadgen.arrivals import Arrivals, length_sampler, synthetic
from loadgen.churn import PriorityChurn
from loadgen.http_client import HttpClient
from loadgen.outcome import Client
from loadgen.prompts import PromptFactory
from loadgen.replay import Progress, RunResult, replay
from loadgen.trace import Trace
from loadgen.workload import Planned, ReplayConfig, block_tokens, plan


@dataclass(frozen=True)
class Target:
    url: str  # http(s)://HOST:PORT/v1 or grpc://HOST:PORT
    model: str
    chat: bool = False
    timeout_s: float = 600.0
    ignore_eos: bool = True
    extra_body: dict = field(default_factory=dict)

    @property
    def is_grpc(self) -> bool:
        return self.url.startswith("grpc://")

    def client(self) -> Client:
        if self.is_grpc:
            from loadgen.grpc_client import GrpcClient  # grpc only when asked for

            temp = self.extra_body.get("temperature")
            return GrpcClient(
                self.url, self.model, self.chat, self.timeout_s, self.ignore_eos, temp
            )
        return HttpClient(
            self.url, self.model, self.chat, self.timeout_s, self.ignore_eos, self.extra_body
        )

    def describe(self) -> dict:
        return {
            "url": self.url,
            "model": self.model,
            "api": "chat" if self.chat else "completions",
            "ignore_eos": self.ignore_eos,
            "extra_body": self.extra_body,
        }


@dataclass(frozen=True)
class Workload:
    cfg: ReplayConfig
    trace: Trace | None = None  # replay this...
    arrivals: Arrivals | None = None  # ...or generate arrivals,
    prompt_len: str = "fixed:128"  # with lengths from these specs
    output_len: str = "fixed:128"
    lengths_from: Trace | None = None  # or resampled from this trace

    def __post_init__(self) -> None:
        if (self.trace is None) == (self.arrivals is None):
            raise ValueError("give a trace or an arrival process, not both")
        if (
            self.arrivals is not None
            and self.cfg.max_requests is None
            and (self.cfg.duration_s is None)
        ):
            raise ValueError("a synthetic workload needs --requests or --duration")
        if self.arrivals is not None:
            length_sampler(self.prompt_len), length_sampler(self.output_len)  # fail early

    @property
    def native_rate(self) -> float:
        return self.arrivals.mean_rate if self.arrivals else self.trace.mean_rate

    @property
    def block_tokens(self) -> int:
        return block_tokens(self.trace, self.cfg) if self.trace is not None else 0

    def trace_at(self, rate: float | None, repeat: int = 0) -> tuple[Trace, ReplayConfig]:
        """The trace to plan from and the config that scales it to `rate` (None: as given)."""
        cfg = self.cfg
        if self.trace is not None:
            return self.trace, replace(cfg, rate=rate) if rate is not None else cfg
        arr = self.arrivals.with_rate(rate) if rate is not None else self.arrivals
        n = cfg.max_requests or 0
        if cfg.duration_s is not None:
            by_time = math.ceil(cfg.duration_s * arr.mean_rate * 1.5) + 16
            n = min(n, by_time) if n else by_time
        seed = cfg.seed + 1000 * repeat
        if self.lengths_from is not None:
            tr = synthetic(arr, n, seed, lengths_from=self.lengths_from)
        else:
            tr = synthetic(
                arr, n, seed, length_sampler(self.prompt_len), length_sampler(self.output_len)
            )
        # Synthetic times are already at the rate: no further scaling.
        return tr, replace(cfg, rate=None, speedup=1.0)

    def planned(self, prompts: PromptFactory, rate: float | None = None, repeat: int = 0):
        trace, cfg = self.trace_at(rate, repeat)
        return plan(trace, cfg, prompts)

    def describe(self) -> dict:
        c = self.cfg
        d = {
            "speedup": c.speedup,
            "rate": c.rate,
            "duration_s": c.duration_s,
            "max_requests": c.max_requests,
            "warmup_s": c.warmup_s,
            "max_prompt_tokens": c.max_prompt_tokens,
            "max_output_tokens": c.max_output_tokens,
            "length_scale": c.length_scale,
            "seed": c.seed,
            "tenant_by": c.tenant_by,
            "tenants": [
                {"name": t.name, "share": t.share}
                | ({"on_s": t.on_s, "off_s": t.off_s} if t.on_s is not None else {})
                for t in c.tenants
            ],
            "sessions": (
                {"mean_turns": c.sessions.turns, "think_s": c.sessions.think_s}
                if c.sessions
                else None
            ),
            "priorities": c.priorities.describe() if c.priorities else None,
        }
        if self.trace is not None:
            d["trace"] = {
                "name": self.trace.name,
                "source": self.trace.source,
                "requests": len(self.trace),
                "duration_s": self.trace.duration_s,
                "mean_rate": self.trace.mean_rate,
                "notes": list(self.trace.notes),
            }
        else:
            a = self.arrivals
            d["arrivals"] = {
                "kind": a.kind,
                "rate": a.rate,
                "cv": a.cv,
                "on_s": a.on_s,
                "off_s": a.off_s,
                "mean_rate": a.mean_rate,
            }
            d["lengths"] = (
                {"from": self.lengths_from.name}
                if self.lengths_from
                else {"prompt": self.prompt_len, "output": self.output_len}
            )
        return d


def load_tokenizer(name_or_dir: str | None):
    """A model directory, or a model name pulled earlier into splitserve's cache."""
    if name_or_dir is None:
        return None
    from services.engine.tokenizer import load_tokenizer as load

    path = Path(name_or_dir).expanduser()
    if not path.is_dir():
        home = Path(os.environ.get("SPLITSERVE_HOME") or "~/.cache/splitserve").expanduser()
        cached = home / "models" / name_or_dir
        if not cached.is_dir():
            raise ValueError(
                f"tokenizer not found: {name_or_dir} is neither a model directory nor in "
                f"{home / 'models'} (run `splitserve models pull {name_or_dir}` first)"
            )
        path = cached
    return load(path)


async def execute(
    target: Target,
    planned: list[Planned],
    connections: int = 32,
    progress: Progress | None = None,
    priorities: PriorityChurn | None = None,
) -> RunResult:
    drain = target.timeout_s + 30.0
    return await replay(
        planned, target.client(), connections, progress, drain, priorities=priorities
    )
