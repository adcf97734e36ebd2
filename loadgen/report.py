"""Reports: the JSON a run or a goodput search writes, its terminal summary, and `compare`.

A run report holds the configuration, the summary (metrics.summarize), per-tenant figures,
the fairness and throughput timelines and every request's times, so plots and later analysis
need nothing else. Times in the JSON are seconds.
"""

from __future__ import annotations

import json
import math
import platform
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from loadgen.fairness import FairSpec, fairness_report, timeline
from loadgen.metrics import SLO, summarize
from loadgen.replay import RunResult

VERSION = 1


def auto_window(wall_s: float) -> float:
    """About 50 windows over the run, in round steps."""
    for w in (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0):
        if wall_s / w <= 60:
            return w
    return 300.0


def _num(x: float) -> float | None:
    return None if x is None or math.isnan(x) else round(x, 6)


def run_report(
    result: RunResult,
    config: dict,
    slo: SLO | None,
    window_s: float | None,
    fair: FairSpec | None = None,
) -> dict:
    outs = result.outcomes
    w = window_s or auto_window(result.wall_s)
    tenants = {}
    for name in sorted({o.tenant for o in outs}):
        mine = [o for o in outs if o.tenant == name]
        s = summarize(mine, slo)
        tenants[name] = {
            k: s[k] for k in ("measured", "completed", "failed", "ttft_s", "tpot_s", "e2e_s")
        } | ({"attainment": s["attainment"]} if slo else {})
    t0 = result.t0
    return {
        "kind": "run",
        "version": VERSION,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(result.started_at)),
        "host": platform.node(),
        "config": config,
        "summary": summarize(outs, slo),
        "tenants": tenants,
        "fairness": fairness_report(outs, t0, w, fair),
        "timeline": timeline(outs, t0, w),
        "connections_opened": result.connections_opened,
        "requests": [
            {
                "index": o.index,
                "tenant": o.tenant,
                "warmup": o.warmup,
                "scheduled_s": _num(o.scheduled - t0),
                "send_lag_s": _num(o.send_lag),
                "ttft_s": _num(o.ttft),
                "tpot_s": _num(o.tpot),
                "e2e_s": _num(o.e2e),
                "prompt_tokens": o.prompt_tokens,
                "output_tokens": o.output_tokens,
                "pieces": len(o.chunk_times),
                "priority": o.priority,
                "error": o.error,
            }
            for o in outs
        ],
    }


def write(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")


def load(path: Path) -> dict:
    try:
        r = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read report {path}: {e}") from None
    if not isinstance(r, dict) or r.get("kind") not in ("run", "goodput"):
        raise ValueError(f"{path} is not a splitserve bench report")
    return r


def _ms(x) -> str:
    return "-" if x is None else f"{x * 1e3:,.1f}"


def _pct(x) -> str:
    return "-" if x is None else f"{x * 100:.1f}%"


def print_summary(report: dict, console: Console | None = None) -> None:
    c = console or Console()
    s = report["summary"]
    tp = s["throughput"]
    head = (
        f"{s['completed']}/{s['measured']} requests completed ({s['requests'] - s['measured']} "
        f"warm-up), window {s['window_s']:.1f} s: "
        f"{(tp['requests_per_s'] or 0):.2f} req/s, {(tp['output_tokens_per_s'] or 0):,.0f} "
        f"output tok/s, {(tp['prompt_tokens_per_s'] or 0):,.0f} prompt tok/s"
    )
    c.print(head, highlight=False)
    t = Table(title="latency (ms)")
    for col in ("metric", "mean", "p50", "p90", "p99", "max"):
        t.add_column(col, justify="right" if col != "metric" else "left")
    for key, label in (
        ("ttft_s", "TTFT"),
        ("tpot_s", "TPOT"),
        ("itl_s", "ITL"),
        ("e2e_s", "e2e"),
        ("send_lag_s", "send lag"),
    ):
        d = s[key]
        t.add_row(label, *(_ms(d[k]) for k in ("mean", "p50", "p90", "p99", "max")))
    c.print(t)
    if "attainment" in s:
        a, slo = s["attainment"], s["slo"]
        c.print(
            f"SLO TTFT <= {slo['ttft_s'] * 1e3:g} ms: {_pct(a['ttft'])}, TPOT <= "
            f"{slo['tpot_s'] * 1e3:g} ms: {_pct(a['tpot'])}, both: {_pct(a['both'])}",
            highlight=False,
        )
    if len(report["tenants"]) > 1:
        tt = Table(title="tenants")
        for col in ("tenant", "done", "failed", "TTFT p50", "TTFT p99", "service"):
            tt.add_column(col, justify="right" if col != "tenant" else "left")
        total = report["fairness"].get("total", {})
        for name, d in report["tenants"].items():
            tt.add_row(
                name,
                str(d["completed"]),
                str(d["failed"]),
                _ms(d["ttft_s"]["p50"]),
                _ms(d["ttft_s"]["p99"]),
                f"{total.get(name, 0):,.0f}",
            )
        c.print(tt)
        gap = report["fairness"]["gap"]
        if gap and gap["max"] is not None:
            c.print(
                f"service gap between backlogged tenants (per {report['fairness']['window_s']:g}"
                f" s window): max {gap['max']:,.0f}, mean {gap['mean']:,.0f} "
                f"({gap['windows_compared']} windows)",
                highlight=False,
            )
        _print_vtc(report["fairness"].get("vtc"), c)
    _print_tails(report["fairness"].get("tails"), c)
    if s["errors"]:
        c.print(f"[red]errors:[/] {s['errors']}", highlight=False)
    if s["prompt_token_mismatches"]:
        c.print(
            f"[yellow]note:[/] the server counted {s['prompt_token_mismatches']} prompts "
            "differently from the plan (no --tokenizer, another model's tokenizer, or a chat "
            "template that differs)",
            highlight=False,
        )
    lag = s["send_lag_s"]
    if lag["p99"] is not None and lag["p99"] > 0.005:
        c.print(
            f"[yellow]warning:[/] p99 send lag {lag['p99'] * 1e3:.1f} ms: the generator fell "
            "behind its schedule; the load offered was lighter than planned",
            highlight=False,
        )


def _print_vtc(v: dict | None, c: Console) -> None:
    if not v or v["max_gap"] is None:
        return
    line = f"VTC gap (any interval both backlogged): max {v['max_gap']:,.0f}"
    if v["u"]:
        verdict = "within 2U" if v["within_2u"] else "over 2U"
        line += f" = {v['max_gap_over_u']:.2f} U (U = {v['u']:,.0f}: {verdict})"
    if v["jain"] is not None:
        line += f"; Jain {v['jain']:.3f}"
    if v["jain_all_backlogged"] is not None:
        line += f" ({v['jain_all_backlogged']:.3f} while all backlogged)"
    c.print(line, highlight=False)


def _print_tails(tails: dict | None, c: Console) -> None:
    groups = (tails or {}).get("priorities")
    if not groups:
        return
    t = Table(title="by priority (ms)")
    for col in ("priority", "done", "TTFT p99", "TTFT p99.9", "TBT p99", "TBT p99.9"):
        t.add_column(col, justify="right")
    for p, d in groups.items():
        ttft, tbt = d["ttft_s"], d["tbt_s"]
        t.add_row(
            p, str(ttft["count"]), _ms(ttft["p99"]), _ms(ttft["p999"]), _ms(tbt["p99"]),
            _ms(tbt["p999"]),
        )  # fmt: skip
    c.print(t)


# -- compare ----------------------------------------------------------------------------------

# (label, path into a run summary, higher is better)
_RUN_FIELDS = (
    ("requests/s", ("throughput", "requests_per_s"), True),
    ("output tok/s", ("throughput", "output_tokens_per_s"), True),
    ("TTFT p50", ("ttft_s", "p50"), False),
    ("TTFT p99", ("ttft_s", "p99"), False),
    ("TPOT p50", ("tpot_s", "p50"), False),
    ("TPOT p99", ("tpot_s", "p99"), False),
    ("ITL p99", ("itl_s", "p99"), False),
    ("e2e p50", ("e2e_s", "p50"), False),
    ("e2e p99", ("e2e_s", "p99"), False),
    ("attainment TTFT", ("attainment", "ttft"), True),
    ("attainment TPOT", ("attainment", "tpot"), True),
    ("attainment both", ("attainment", "both"), True),
)


def _get(d: dict, path: Sequence[str]):
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def compare_rows(a: dict, b: dict) -> list[tuple[str, float | None, float | None, float | None]]:
    """(metric, A, B, B/A) for the figures both reports have."""
    rows = []
    if a["kind"] == "goodput" or b["kind"] == "goodput":
        ga, gb = a.get("goodput_rps"), b.get("goodput_rps")
        rows.append(("goodput req/s", ga, gb, gb / ga if ga and gb is not None else None))
        a, b = a.get("best_run") or {}, b.get("best_run") or {}
    for label, path, _ in _RUN_FIELDS:
        x, y = _get(a.get("summary", {}), path), _get(b.get("summary", {}), path)
        if x is None and y is None:
            continue
        rows.append((label, x, y, y / x if x and y is not None else None))
    return rows


def print_compare(a: dict, b: dict, names: tuple[str, str], console: Console | None = None):
    c = console or Console()
    t = Table(title=f"B/A: B = {names[1]}, A = {names[0]}")
    for col in ("metric", "A", "B", "B/A"):
        t.add_column(col, justify="right" if col != "metric" else "left")
    for label, x, y, r in compare_rows(a, b):
        fmt = (
            _pct
            if label.startswith("attainment")
            else (
                _ms
                if label.startswith(("TTFT", "TPOT", "ITL", "e2e"))
                else (lambda v: "-" if v is None else f"{v:,.2f}")
            )
        )
        t.add_row(label, fmt(x), fmt(y), "-" if r is None else f"{r:.3f}")
    c.print(t)
