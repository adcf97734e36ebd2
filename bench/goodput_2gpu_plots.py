"""Figures of a `bench/goodput_2gpu.py` report: SLO attainment, TTFT and TPOT p90 against the
offered rate for each configuration, and where a disaggregated request's time to first token
went (queue, prefill, publish; the decode-side pull after it).

    python bench/goodput_2gpu_plots.py REPORT.json [REPORT.json ...] --out DIR

Several reports overlay (each labelled by its file name); the warm-up probe is left out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def series(report: dict, label: str):
    """(label, mode, probes sorted by rate) for each configuration in the report."""
    for r in report["results"]:
        probes = sorted(
            (p for p in r["probes"] if not p.get("discarded_warmup") and not p.get("skipped")),
            key=lambda p: p["rate"],
        )
        yield label, r["mode"], probes


def plot(reports: list[tuple[str, dict]], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    slo = reports[0][1]["summary"]["slo"]
    rows = [s for label, rep in reports for s in series(rep, label)]
    made = []

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for label, mode, ps in rows:
        ax.plot([p["rate"] for p in ps], [p["attainment"]["both"] for p in ps], "o-",
                label=f"{mode} ({label})")  # fmt: skip
    ax.axhline(slo["attainment"], color="grey", ls="--", lw=1, label="target")
    ax.set(xlabel="offered rate (req/s)", ylabel="share meeting both SLOs",
           title=f"TTFT <= {slo['ttft_s']:g} s and TPOT <= {slo['tpot_s'] * 1e3:g} ms")  # fmt: skip
    ax.legend(fontsize=7)
    made.append(_save(fig, out / "attainment_vs_rate.png"))

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for label, mode, ps in rows:
        rates = [p["rate"] for p in ps]
        a1.plot(rates, [p["ttft_p90_s"] for p in ps], "o-", label=f"{mode} ({label})")
        a2.plot(rates, [p["tpot_p90_s"] * 1e3 for p in ps], "o-", label=f"{mode} ({label})")
    a1.axhline(slo["ttft_s"], color="grey", ls="--", lw=1)
    a2.axhline(slo["tpot_s"] * 1e3, color="grey", ls="--", lw=1)
    a1.set(xlabel="offered rate (req/s)", ylabel="TTFT p90 (s)", yscale="log")
    a2.set(xlabel="offered rate (req/s)", ylabel="TPOT p90 (ms)")
    a1.legend(fontsize=7)
    made.append(_save(fig, out / "latency_vs_rate.png"))

    disagg = [(label, ps) for label, mode, ps in rows if mode == "disaggregated"]
    if disagg:
        label, ps = disagg[0]
        keys = ("queue_ms", "prefill_ms", "publish_ms", "transfer_ms")
        fig, ax = plt.subplots(figsize=(6.4, 4))
        bottom = [0.0] * len(ps)
        x = [f"{p['rate']:g}" for p in ps]
        for k in keys:
            v = [(p["server_split"].get(k) or 0.0) for p in ps]
            ax.bar(x, v, bottom=bottom, label=k.removesuffix("_ms"))
            bottom = [b + y for b, y in zip(bottom, v, strict=True)]
        ax.set(xlabel="offered rate (req/s)", ylabel="mean ms a request",
               title=f"disaggregated: where the time goes ({label})")  # fmt: skip
        ax.legend(fontsize=7)
        made.append(_save(fig, out / "disaggregated_split.png"))
    return made


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("reports", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    reports = [(p.stem, json.loads(p.read_text())) for p in args.reports]
    for path in plot(reports, args.out):
        print(path)


if __name__ == "__main__":
    main()
