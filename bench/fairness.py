"""Fair admission at the router: VTC vs FCFS vs per-tenant limits, with two router replicas
sharing one real Redis (the embedded valkey), over a simulated pool.

A heavy tenant bursts (on/off: a burst at the start and another halfway) and a light tenant
sends at a steady rate; both stay backlogged. Each router admits at most --inflight sequences;
the pool serves every admitted sequence one output token per --token-ms (so capacity is the
number of sequences in flight, and what differs between orders is who gets it).

Reported per order: per-tenant service over time (VTC's measure: 1 per prompt token, 2 per
output token), the largest service gap between the two tenants over any interval where both
are backlogged, over U = max(w_p * L_input, w_q * M) (M: the tokens the pool holds at once;
VTC bounds the gap by 2U), Jain's index of the service, and throughput (tokens/s).

    python bench/fairness.py --quick --json bench/results/fairness-cpu-quick.json
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import write_report
from protos.splitserve.v1 import common_pb2 as cpb
from router.fair_backend import FairBackend
from router.tenants import Tenant
from router.vtc import VTC, FairnessConfig
from rpc.piece import Piece
from services.engine.sampling_params import SamplingParams

W_IN, W_OUT = 1.0, 2.0


class SimPool:
    """One output token per token_s for every admitted sequence; logs service events."""

    def __init__(self, token_s: float) -> None:
        self.token_s = token_s
        self.events: list[tuple[float, str, float]] = []  # (time, tenant, service)

    def models(self):
        return [("sim", 1 << 20)]

    async def generate(self, model, prompt_ids, params, request_id, tenant="", **_):
        await asyncio.sleep(self.token_s)  # the prefill
        self.events.append((time.monotonic(), tenant, W_IN * len(prompt_ids)))
        for i in range(params.max_tokens):
            if i:
                await asyncio.sleep(self.token_s)
            self.events.append((time.monotonic(), tenant, W_OUT))
            last = i == params.max_tokens - 1
            usage = cpb.Usage(prompt_tokens=len(prompt_ids), completion_tokens=i + 1)
            yield Piece(
                [1], "", finish_reason="length" if last else "", usage=usage if last else None
            )


class Limited:
    """The per-tenant limits baseline: each tenant at most `cap` sequences per router, in
    arrival order (router.tenants.Tenant), no cross-tenant order."""

    def __init__(self, inner, cap: int) -> None:
        self.inner = inner
        self.tenants = {t: Tenant(t, cap, 1 << 20) for t in ("heavy", "light")}

    async def generate(self, model, prompt_ids, params, request_id, tenant="", **kw):
        t = self.tenants[tenant]
        await t.acquire()
        try:
            async for p in self.inner.generate(model, prompt_ids, params, request_id, tenant, **kw):
                yield p
        finally:
            t.release()

    async def close(self):
        await self.inner.close() if hasattr(self.inner, "close") else None


async def _one(backend, tenant: str, n_in: int, n_out: int, spans: dict, rid: str) -> None:
    t0 = time.monotonic()
    params = SamplingParams(max_tokens=n_out)
    async for _ in backend.generate("sim", [1] * n_in, params, rid, tenant=tenant):
        pass
    spans[tenant].append((t0, time.monotonic()))


async def scenario(order: str, redis_url: str, args) -> dict:
    pool = SimPool(args.token_ms / 1e3)
    ns = f"fair-{order}-{time.monotonic_ns()}"
    if order == "limits":
        cfg = FairnessConfig(order="fcfs", max_inflight=args.inflight)
        routers = [
            Limited(
                FairBackend(pool, VTC(redis_url, ns, cfg, router_id=f"r{i}")), args.inflight // 2
            )
            for i in range(2)
        ]
    else:
        cfg = FairnessConfig(order=order, max_inflight=args.inflight)
        routers = [FairBackend(pool, VTC(redis_url, ns, cfg, router_id=f"r{i}")) for i in range(2)]
    spans: dict[str, list] = {"heavy": [], "light": []}
    tasks: list[asyncio.Task] = []
    start = time.monotonic()

    def burst(k0: int) -> None:
        for k in range(args.heavy):
            b = routers[k % 2]
            tasks.append(
                asyncio.create_task(_one(b, "heavy", args.n_in, args.n_out, spans, f"h{k0}{k}"))
            )

    burst(0)
    gap = args.light_gap_ms / 1e3
    for k in range(args.light):
        if k == args.light // 2:
            burst(1)  # the heavy tenant comes back on
        b = routers[k % 2]
        tasks.append(asyncio.create_task(_one(b, "light", args.n_in, args.n_out, spans, f"l{k}")))
        await asyncio.sleep(gap)
    await asyncio.wait_for(asyncio.gather(*tasks), 600)
    end = time.monotonic()
    for b in routers:
        await b.close()
    return analyse(order, pool.events, spans, start, end, args)


def _backlogged(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def analyse(order, events, spans, start, end, args) -> dict:
    # U = max(w_p * longest prompt, w_q * M), M: tokens resident in the pool at once.
    m = 2 * args.inflight * (args.n_in + args.n_out)
    u = max(W_IN * args.n_in, W_OUT * m)
    both = []
    bh, bl = _backlogged(spans["heavy"]), _backlogged(spans["light"])
    for a1, b1 in bh:
        for a2, b2 in bl:
            lo, hi = max(a1, a2), min(b1, b2)
            if hi > lo:
                both.append((lo, hi))
    events.sort()
    worst = 0.0
    for lo, hi in both:  # max over sub-intervals of |dW_h - dW_l| = max D - min D
        d = dmax = dmin = 0.0
        for t, who, s in events:
            if lo <= t <= hi:
                d += s if who == "heavy" else -s
                dmax, dmin = max(dmax, d), min(dmin, d)
        worst = max(worst, dmax - dmin)
    total = {t: sum(s for _, w, s in events if w == t) for t in ("heavy", "light")}
    x = list(total.values())
    jain = sum(x) ** 2 / (len(x) * sum(v * v for v in x)) if any(x) else None
    window = max((end - start) / 40, 1e-3)
    series = {t: [] for t in total}
    acc = {t: 0.0 for t in total}
    times = []
    edge = start + window
    for t, who, s in events:
        while t > edge:
            times.append(edge - start)
            for n in series:
                series[n].append(acc[n])
            edge += window
        acc[who] += s
    times.append(edge - start)
    for n in series:
        series[n].append(acc[n])
    tokens = sum(1 for _, _, s in events if s == W_OUT) + sum(
        s / W_IN for _, _, s in events if s != W_OUT
    )
    return {
        "order": order,
        "u": u,
        "max_gap": worst,
        "max_gap_over_u": worst / u,
        "jain": jain,
        "service": total,
        "seconds": end - start,
        "tokens_per_s": tokens / (end - start),
        "light_mean_latency_s": sum(b - a for a, b in spans["light"]) / max(1, len(spans["light"])),
        "timeline": {"t": times, "service": series},
    }


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 3), sharey=True)
    for ax, r in zip(axes, results, strict=True):
        for name, ys in r["timeline"]["service"].items():
            ax.plot(r["timeline"]["t"], ys, label=name)
        ax.set_title(f"{r['order']}: gap/U {r['max_gap_over_u']:.2f}")
        ax.set_xlabel("s")
    axes[0].set_ylabel("service (weighted tokens)")
    axes[0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small run (< 60 s on 2 cores)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None, help="service over time, per order")
    ap.add_argument("--inflight", type=int, default=4, help="sequences per router at once")
    ap.add_argument("--token-ms", type=float, default=4.0)
    args = ap.parse_args(argv)
    args.n_in, args.n_out = 16, 16
    args.heavy, args.light = (60, 40) if args.quick else (200, 120)
    # The light tenant alone would take about 60% of the capacity: it stays backlogged.
    per_req_s = (args.n_out + 1) * args.token_ms / 1e3
    args.light_gap_ms = 1e3 * per_req_s / (2 * args.inflight) / 0.6

    from kvstore.redis_server import EmbeddedRedis

    results = []
    with EmbeddedRedis() as r:
        for order in ("vtc", "fcfs", "limits"):
            results.append(asyncio.run(scenario(order, r.url, args)))
    by = {x["order"]: x for x in results}
    summary = {
        "vtc_max_gap_over_u": round(by["vtc"]["max_gap_over_u"], 3),
        "fcfs_max_gap_over_u": round(by["fcfs"]["max_gap_over_u"], 3),
        "limits_max_gap_over_u": round(by["limits"]["max_gap_over_u"], 3),
        "vtc_throughput_ratio_to_fcfs": round(
            by["vtc"]["tokens_per_s"] / by["fcfs"]["tokens_per_s"], 3
        ),
        "limits_throughput_ratio_to_fcfs": round(
            by["limits"]["tokens_per_s"] / by["fcfs"]["tokens_per_s"], 3
        ),
    }
    for x in results:
        print(
            f"{x['order']:>6}: gap/U {x['max_gap_over_u']:.2f}  Jain {x['jain']:.3f}  "
            f"{x['tokens_per_s']:.0f} tok/s  light latency {x['light_mean_latency_s']:.2f} s"
        )
    print(summary)
    if args.plot is not None:
        plot(results, args.plot)
    write_report(args.json, "fairness", argv, results, summary)


if __name__ == "__main__":
    main()
