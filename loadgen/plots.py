"""PNG plots of reports (matplotlib, headless): TTFT and TPOT CDFs, throughput over time,
per-tenant service over time, and SLO attainment against rate. Every function takes one or
more (label, report) pairs, so `compare` overlays two configurations on the same axes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI; must precede pyplot's import
import matplotlib.pyplot as plt
import numpy as np

Labeled = Sequence[tuple[str, dict]]


def _run_of(report: dict) -> dict:
    """A goodput report's plots describe its run at the goodput rate."""
    return report.get("best_run") or {} if report["kind"] == "goodput" else report


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def cdf(reports: Labeled, key: str, path: Path) -> Path:
    """key: ttft_s | tpot_s | e2e_s (per-request values of measured, completed requests)."""
    names = {"ttft_s": "TTFT", "tpot_s": "TPOT", "e2e_s": "end-to-end latency"}
    fig, ax = plt.subplots(figsize=(6, 4))
    slo = None
    for label, rep in reports:
        run = _run_of(rep)
        xs = np.sort(
            [
                r[key] * 1e3
                for r in run.get("requests", [])
                if not r["warmup"] and r["error"] is None and r[key] is not None
            ]
        )
        if xs.size:
            ax.plot(xs, np.arange(1, xs.size + 1) / xs.size, label=label, drawstyle="steps-post")
        slo = slo or run.get("summary", {}).get("slo")
    if slo and key in ("ttft_s", "tpot_s"):
        ax.axvline(slo[key] * 1e3, color="grey", ls="--", lw=1, label=f"SLO {slo[key] * 1e3:g} ms")
    ax.set_xlabel(f"{names[key]} (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1.01)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"{names[key]} CDF")
    return _save(fig, path)


def throughput(reports: Labeled, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, rep in reports:
        tl = _run_of(rep).get("timeline", {})
        if tl.get("t"):
            ax.step(tl["t"], tl["output_tokens_per_s"], where="post", label=label)
    ax.set_xlabel("time since the run started (s)")
    ax.set_ylabel("output tokens/s")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("throughput over time")
    return _save(fig, path)


def tenant_service(report: dict, path: Path) -> Path:
    fair = _run_of(report).get("fairness", {})
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, series in fair.get("service", {}).items():
        ax.step(fair["t"], series, where="post", label=name)
    w = fair.get("weights", {"input": 1, "output": 2})
    ax.set_xlabel("time since the run started (s)")
    ax.set_ylabel(f"service received ({w['input']:g}·prompt + {w['output']:g}·output tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    gap = fair.get("gap") or {}
    vtc = fair.get("vtc") or {}
    extra = ""
    if vtc.get("max_gap_over_u") is not None:
        extra = f" (VTC gap {vtc['max_gap_over_u']:.2f} U)"
    elif gap.get("max") is not None:
        extra = f" (largest gap {gap['max']:,.0f} in a {fair['window_s']:g} s window)"
    ax.set_title(f"per-tenant service, cumulative{extra}")
    return _save(fig, path)


def attainment_vs_rate(reports: Labeled, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    target = None
    for label, rep in reports:
        probes = sorted(rep.get("probes", []), key=lambda p: p["rate"])
        if not probes:
            continue
        rates = [p["rate"] for p in probes]
        line = ax.plot(rates, [p["attainment"] for p in probes], marker="o", label=label)[0]
        for p in probes:  # each repeat, to show the spread
            ax.scatter(
                [p["rate"]] * len(p["attainments"]),
                p["attainments"],
                s=8,
                color=line.get_color(),
                alpha=0.4,
            )
        if rep.get("goodput_rps"):
            ax.axvline(rep["goodput_rps"], color=line.get_color(), ls=":", lw=1)
        target = target or rep.get("target")
    if target:
        ax.axhline(target, color="grey", ls="--", lw=1, label=f"target {target:.0%}")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("SLO attainment (TTFT and TPOT)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("attainment against rate")
    return _save(fig, path)


def all_plots(reports: Labeled, out_dir: Path) -> list[Path]:
    """Every plot that applies: CDFs and throughput for all, tenants when there are several,
    attainment against rate for goodput reports."""
    out = [
        cdf(reports, "ttft_s", out_dir / "ttft_cdf.png"),
        cdf(reports, "tpot_s", out_dir / "tpot_cdf.png"),
        throughput(reports, out_dir / "throughput.png"),
    ]
    for label, rep in reports:
        if len(_run_of(rep).get("fairness", {}).get("service", {})) > 1:
            suffix = "" if len(reports) == 1 else f"_{_slug(label)}"
            out.append(tenant_service(rep, out_dir / f"tenant_service{suffix}.png"))
    if any(rep["kind"] == "goodput" for _, rep in reports):
        out.append(attainment_vs_rate(reports, out_dir / "attainment_vs_rate.png"))
    return out


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in s)[:40]
