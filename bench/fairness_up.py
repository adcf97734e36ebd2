"""Fair admission end to end: a heavy on/off tenant and a steady light one replayed against
`splitserve up` with two router replicas, under VTC and under FCFS.

Each order gets a fresh `splitserve up --config` (the tiny preset, colocated, two router
replicas sharing the private Redis, a tenants file with a `fairness:` section of that order,
`max_inflight` sequences per router). The load generator plans one synthetic stream (fixed
arrivals, fixed lengths) split between the tenants by share: the heavy tenant's share is large
but it is on/off (it sends during `on` seconds, then is silent for `off`), the light tenant's
small and steady. Both orders replay the same plan over HTTP.

Reported per order (loadgen.fairness): per-tenant service over time, VTC's gap (the largest
service difference between the tenants over any interval in which both had requests waiting
for their first token) over U = max(w_in * longest prompt, w_out * M), M = 2 routers x
max_inflight x (prompt + output) tokens; VTC bounds it by 2U. Also Jain's index (over the
run, and over the time both tenants were backlogged: the run's totals are the plan's, whatever
the order), throughput and each tenant's TTFT tail.

    python bench/fairness_up.py --json bench/results/fairness-up.json \
        --plot docs/fairness/service_up.png
    python bench/fairness_up.py --quick
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import redis
import yaml

from bench.report import write_report
from bench.up_process import free_port, splitserve_up
from loadgen.arrivals import Arrivals, synthetic
from loadgen.fairness import FairSpec, fairness_report
from loadgen.http_client import HttpClient
from loadgen.prompts import PromptFactory
from loadgen.replay import replay
from loadgen.workload import Planned, ReplayConfig, Tenant, plan

ROUTERS = 2
KEYS = {"heavy": "heavy-key", "light": "light-key"}
NAMESPACE = "fair"


@dataclass(frozen=True)
class Scenario:
    rate: float = 120.0  # requests/s of the whole stream (before the heavy tenant's gate)
    seconds: float = 2.0  # of arrivals
    heavy_share: float = 5.0  # the light tenant's is 1
    on_s: float = 0.4  # the heavy tenant's on/off periods
    off_s: float = 0.8
    prompt_tokens: int = 16
    output_tokens: int = 16
    max_inflight: int = 2  # sequences per router replica
    seed: int = 0

    @property
    def pool_tokens(self) -> int:
        """M: tokens the pools hold at once (every admitted sequence at its longest)."""
        return ROUTERS * self.max_inflight * (self.prompt_tokens + self.output_tokens)


def write_config(directory: Path, order: str, sc: Scenario, port: int, redis_url: str) -> Path:
    """The tenants file (API keys by digest, limits far above the load, the fairness section)
    and the application config with two router replicas; returns the config's path."""
    tenants = {
        "tenants": [
            {"name": name, "keys": [hashlib.sha256(key.encode()).hexdigest()],
             "max_concurrent": 4096, "max_queued": 4096}
            for name, key in KEYS.items()
        ],
        "fairness": {"order": order, "max_inflight": sc.max_inflight},
    }  # fmt: skip
    tf = directory / f"tenants-{order}.yaml"
    tf.write_text(yaml.safe_dump(tenants))
    app = {
        "redis": redis_url,
        "namespace": NAMESPACE,
        "http": {"host": "127.0.0.1", "port": port},
        "grpc": {"host": "127.0.0.1", "port": 0},
        "auth": {"enabled": True, "tenants_file": str(tf)},
        "metrics": {"port": 0},
        "router": {"replicas": ROUTERS},
        "models": [{"name": "tiny", "path": "tiny", "mode": "colocated"}],
    }
    cf = directory / f"app-{order}.yaml"
    cf.write_text(yaml.safe_dump(app))
    return cf


def workload(sc: Scenario, prompts: PromptFactory) -> list[Planned]:
    n = int(sc.rate * sc.seconds)
    tr = synthetic(
        Arrivals("fixed", sc.rate), n, sc.seed,
        lambda k, _: np.full(k, sc.prompt_tokens), lambda k, _: np.full(k, sc.output_tokens),
    )  # fmt: skip
    tenants = (
        Tenant("heavy", KEYS["heavy"], sc.heavy_share, sc.on_s, sc.off_s),
        Tenant("light", KEYS["light"], 1.0),
    )
    return plan(tr, ReplayConfig(tenants=tenants, seed=sc.seed), prompts)


def run_order(order: str, sc: Scenario, work_dir: Path, timeout_s: float = 300.0) -> dict:
    """One fresh system of this order; the plan replayed; the report's figures."""
    from kvstore.redis_server import EmbeddedRedis
    from services.engine.tokenizer import load_tokenizer
    from splitserve.models_pull import splitserve_home

    # Our own Redis (not up's private one): afterwards it shows which routers shared counters.
    with EmbeddedRedis() as r:
        cfg = write_config(work_dir, order, sc, free_port(), r.url)
        with splitserve_up("--config", str(cfg)) as url:
            tok = load_tokenizer(splitserve_home() / "models" / "preset-tiny")
            planned = workload(sc, PromptFactory(tok, "ids", sc.seed))
            client = HttpClient(url + "/v1", "tiny", timeout_s=timeout_s)
            res = asyncio.run(replay(planned, client, 16, drain_timeout_s=timeout_s))
            with redis.Redis.from_url(r.url) as db:
                routers = len(db.zrange(f"{NAMESPACE}:vtc:routers", 0, -1))
                c = db.hgetall(f"{NAMESPACE}:vtc:c")
                counters = {k.decode(): float(v) for k, v in c.items()}
    outs = res.outcomes
    fair = fairness_report(
        outs, res.t0, max(res.wall_s / 40, 0.05), FairSpec(pool_tokens=sc.pool_tokens)
    )
    ok = [o for o in outs if o.ok]
    tokens = sum(o.prompt_tokens + o.output_tokens for o in ok)
    v = fair["vtc"]
    return {
        "order": order,
        "routers_sharing_counters": routers,
        "counters": counters,
        "requests": len(outs),
        "failed": len(outs) - len(ok),
        "errors": sorted({o.error for o in outs if o.error})[:5],
        "by_tenant": {n: sum(o.tenant == n for o in outs) for n in KEYS},
        "seconds": res.wall_s,
        "tokens_per_s": tokens / res.wall_s if res.wall_s > 0 else None,
        "u": v["u"],
        "max_gap": v["max_gap"],
        "max_gap_over_u": v["max_gap_over_u"],
        "max_gap_between": v["max_gap_between"],
        "within_2u": v["within_2u"],
        "jain": v["jain"],
        "jain_all_backlogged": v["jain_all_backlogged"],
        "ttft_p99_s": {n: d["ttft_s"]["p99"] for n, d in fair["tails"]["tenants"].items()},
        "timeline": {"t": fair["t"], "service": fair["service"]},
    }


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 3.2), sharey=True)
    for ax, r in zip(np.atleast_1d(axes), results, strict=True):
        for name, ys in r["timeline"]["service"].items():
            ax.step(r["timeline"]["t"], ys, where="post", label=name)
        ax.set_title(f"{r['order'].upper()}: gap {r['max_gap_over_u']:.2f} U")
        ax.set_xlabel("s since the first request")
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("service (prompt + 2 x output tokens)")
    np.atleast_1d(axes)[0].legend()
    fig.suptitle("splitserve up, 2 router replicas: heavy on/off tenant vs steady light tenant")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small run (< 60 s on 2 cores)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None, help="service over time, per order")
    ap.add_argument("--seconds", type=float, default=None, help="of arrivals (default 6; quick 2)")
    ap.add_argument("--inflight", type=int, default=2, help="sequences per router replica")
    args = ap.parse_args(argv)
    secs = args.seconds or (2.0 if args.quick else 6.0)
    sc = Scenario(seconds=secs, max_inflight=args.inflight)
    results = []
    with tempfile.TemporaryDirectory() as d:
        for order in ("vtc", "fcfs"):
            results.append(run_order(order, sc, Path(d)))
    by = {r["order"]: r for r in results}
    summary = {
        "vtc_max_gap_over_u": round(by["vtc"]["max_gap_over_u"], 3),
        "fcfs_max_gap_over_u": round(by["fcfs"]["max_gap_over_u"], 3),
        "vtc_throughput_ratio_to_fcfs": round(
            by["vtc"]["tokens_per_s"] / by["fcfs"]["tokens_per_s"], 3
        ),
        "vtc_jain_all_backlogged": round(by["vtc"]["jain_all_backlogged"], 4),
        "fcfs_jain_all_backlogged": round(by["fcfs"]["jain_all_backlogged"], 4),
        "light_ttft_p99_ratio_fcfs_to_vtc": round(
            by["fcfs"]["ttft_p99_s"]["light"] / by["vtc"]["ttft_p99_s"]["light"], 2
        ),
    }
    for r in results:
        print(
            f"{r['order']:>4}: gap {r['max_gap_over_u']:.2f} U (U = {r['u']:.0f}), Jain while "
            f"both backlogged {r['jain_all_backlogged']:.3f}, {r['tokens_per_s']:.0f} tok/s, "
            "light TTFT p99 "
            f"{r['ttft_p99_s']['light'] * 1e3:.0f} ms, heavy {r['ttft_p99_s']['heavy'] * 1e3:.0f}"
            f" ms, {r['failed']} failed"
        )
    print(summary)
    if args.plot is not None:
        plot(results, args.plot)
    write_report(args.json, "fairness_up", argv, results, summary, scenario=dataclasses.asdict(sc))


if __name__ == "__main__":
    main()
