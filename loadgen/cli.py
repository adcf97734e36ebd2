"""`splitserve bench`: replay a trace or a synthetic workload against an OpenAI-compatible or
splitserve gRPC endpoint, and report latency, SLO attainment, goodput and tenant fairness.

Heavy imports (numpy, matplotlib, grpc, the tokenizer) happen inside commands so `--help`
stays instant.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from loadgen import options as o

app = typer.Typer(
    help="Load generator: replay traces, measure SLO attainment, goodput and fairness.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console(soft_wrap=True)


async def _with_progress(coro, prog, label: str, quiet: bool):
    """Runs `coro`, showing `prog`'s counts in a progress bar (refreshed 5 times a second, so
    the display never competes with the schedule)."""
    if quiet or not o.err.is_terminal:
        return await coro
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("sent {task.fields[sent]}, errors {task.fields[errors]}"),
        TimeElapsedColumn(),
        console=o.err,
        transient=True,
        auto_refresh=False,
    ) as bar:
        task = bar.add_task(label, total=prog.total, sent=0, errors=0)
        job = asyncio.ensure_future(coro)
        while not job.done():
            bar.update(task, completed=prog.done, sent=prog.sent, errors=prog.errors)
            bar.refresh()
            await asyncio.wait({job}, timeout=0.2)
        return job.result()


def _config(work, target, prompts, connections) -> dict:
    return {
        "target": target.describe(),
        "workload": work.describe(),
        "prompts": {
            "mode": prompts.mode,
            "exact": prompts.exact,
            "tokenizer": str(getattr(prompts.tokenizer, "model_dir", None)),
        },
        "connections": connections,
        "argv": sys.argv[1:],
    }


def _save(report: dict, out_dir: Path | None, plots: bool, label: str) -> None:
    if out_dir is None:
        return
    from loadgen import plots as P
    from loadgen.report import write

    write(report, out_dir / "report.json")
    made = P.all_plots([(label, report)], out_dir) if plots else []
    o.err.print(
        f"report: {out_dir / 'report.json'}" + (f"; {len(made)} plots" if made else ""),
        highlight=False,
    )


@app.command()
def run(
    url: o.Url = "http://127.0.0.1:8000/v1",
    model: o.Model = "smollm2-135m-instruct",
    api: o.Api = "completions",
    prompt_format: o.PromptFormat = "text",
    tokenizer: o.TokenizerOpt = None,
    trace: o.TraceOpt = None,
    fmt: o.FormatOpt = None,
    arrivals: o.ArrivalsOpt = None,
    prompt_len: o.PromptLen = "fixed:128",
    output_len: o.OutputLen = "fixed:128",
    lengths_from: o.LengthsFrom = None,
    speedup: o.Speedup = 1.0,
    rate: o.Rate = None,
    duration: o.Duration = None,
    requests: o.Requests = None,
    warmup: o.Warmup = 0.0,
    max_prompt_tokens: o.MaxPrompt = None,
    max_output_tokens: o.MaxOutput = None,
    length_scale: o.LengthScale = 1.0,
    tenant: o.Tenants = None,
    tenant_by: o.TenantBy = None,
    sessions: o.SessionsOpt = None,
    priorities: o.PrioritiesOpt = None,
    pool_tokens: o.PoolTokens = None,
    fair_weight: o.FairWeights = None,
    service_weights: o.ServiceWeights = "1:2",
    api_key: o.ApiKey = None,
    slo_ttft: o.SloTtft = None,
    slo_tpot: o.SloTpot = None,
    attainment: o.Attain = 0.9,
    seed: o.Seed = 0,
    timeout: o.Timeout = 600.0,
    connections: o.Conns = 32,
    ignore_eos: o.IgnoreEos = True,
    extra: o.Extra = None,
    out_dir: o.OutDir = None,
    plots: Annotated[bool, typer.Option("--plots/--no-plots")] = True,
    window: o.Window = None,
    include_failures: o.Failures = False,
    quiet: o.Quiet = False,
) -> None:
    """Replay once (open loop) and print the summary; --out DIR writes report.json and plots."""
    from loadgen.replay import Progress
    from loadgen.replay import run as run_loop
    from loadgen.report import print_summary, run_report
    from loadgen.runner import execute

    work, prompts, target = o.build(locals())
    fair = o.fair_spec(locals())
    slo = o.slo(slo_ttft, slo_tpot, attainment, required=False)
    try:
        planned = work.planned(prompts)
    except ValueError as e:
        o.fail(str(e))
    if not planned:
        o.fail("the workload has no requests within the caps given")
    prog = Progress(len(planned))
    try:
        result = run_loop(
            _with_progress(
                execute(target, planned, connections, prog, work.cfg.priorities),
                prog,
                f"{len(planned)} requests",
                quiet,
            )
        )
    except OSError as e:
        o.fail(f"cannot reach {url}: {e}", 1)
    report = run_report(result, _config(work, target, prompts, connections), slo, window, fair)
    print_summary(report, out)
    _save(report, out_dir, plots, "run")
    if report["summary"]["completed"] == 0:
        o.fail("no request completed", 1)


@app.command()
def goodput(
    url: o.Url = "http://127.0.0.1:8000/v1",
    model: o.Model = "smollm2-135m-instruct",
    api: o.Api = "completions",
    prompt_format: o.PromptFormat = "text",
    tokenizer: o.TokenizerOpt = None,
    trace: o.TraceOpt = None,
    fmt: o.FormatOpt = None,
    arrivals: o.ArrivalsOpt = None,
    prompt_len: o.PromptLen = "fixed:128",
    output_len: o.OutputLen = "fixed:128",
    lengths_from: o.LengthsFrom = None,
    duration: o.Duration = None,
    requests: o.Requests = None,
    warmup: o.Warmup = 0.0,
    max_prompt_tokens: o.MaxPrompt = None,
    max_output_tokens: o.MaxOutput = None,
    length_scale: o.LengthScale = 1.0,
    tenant: o.Tenants = None,
    tenant_by: o.TenantBy = None,
    sessions: o.SessionsOpt = None,
    priorities: o.PrioritiesOpt = None,
    pool_tokens: o.PoolTokens = None,
    fair_weight: o.FairWeights = None,
    service_weights: o.ServiceWeights = "1:2",
    api_key: o.ApiKey = None,
    slo_ttft: o.SloTtft = None,
    slo_tpot: o.SloTpot = None,
    attainment: o.Attain = 0.9,
    low: Annotated[float, typer.Option("--low", help="Lowest rate to try (req/s)")] = 0.5,
    high: Annotated[float, typer.Option("--high", help="First upper rate to try (req/s)")] = 8.0,
    repeats: Annotated[int, typer.Option("--repeats", help="Runs per probed rate")] = 2,
    tolerance: Annotated[float, typer.Option("--tolerance", help="Relative bracket width")] = 0.05,
    max_probes: Annotated[int, typer.Option("--max-probes")] = 16,
    seed: o.Seed = 0,
    timeout: o.Timeout = 600.0,
    connections: o.Conns = 32,
    ignore_eos: o.IgnoreEos = True,
    extra: o.Extra = None,
    out_dir: o.OutDir = None,
    plots: Annotated[bool, typer.Option("--plots/--no-plots")] = True,
    window: o.Window = None,
    include_failures: o.Failures = False,
    quiet: o.Quiet = False,
) -> None:
    """Find the highest rate meeting both SLOs for --attainment of requests (bisection over the
    rate, --repeats runs per rate). Trace times are scaled to each rate; synthetic arrivals are
    regenerated at it. Cap each run with --requests or --duration."""
    from loadgen.goodput import search
    from loadgen.replay import Progress
    from loadgen.replay import run as run_loop
    from loadgen.report import print_summary, run_report
    from loadgen.runner import execute

    work, prompts, target = o.build(locals())
    fair = o.fair_spec(locals())
    slo = o.slo(slo_ttft, slo_tpot, attainment, required=True)
    config = _config(work, target, prompts, connections)
    reports: dict[tuple[float, int], dict] = {}

    async def measure(rate: float, k: int) -> dict:
        planned = work.planned(prompts, rate, k)
        if not planned:
            raise ValueError(f"no requests at rate {rate:g} within the caps")
        prog = Progress(len(planned))
        res = await _with_progress(
            execute(target, planned, connections, prog, work.cfg.priorities),
            prog,
            f"{rate:.3g} req/s #{k + 1}",
            quiet,
        )
        rep = run_report(res, config | {"rate": rate, "repeat": k}, slo, window, fair)
        reports[(rate, k)] = rep
        return rep["summary"]

    def shown(p) -> None:
        att = ", ".join(f"{a:.1%}" for a in p.attainments)
        verdict = "pass" if p.attainment >= slo.attainment else "fail"
        out.print(f"rate {p.rate:8.3f} req/s: attainment {att} -> {verdict}", highlight=False)
        sys.stdout.flush()  # a search runs for minutes: each probe shows up in logs as it ends

    try:
        res = run_loop(
            search(measure, slo.attainment, low, high, repeats, tolerance, max_probes, shown)
        )
    except ValueError as e:
        o.fail(str(e))
    except OSError as e:
        o.fail(f"cannot reach {url}: {e}", 1)
    best = res.best
    best_run = reports.get((best.rate, 0)) if best else None
    report = {
        "kind": "goodput",
        "version": 1,
        "config": config,
        "target": slo.attainment,
        "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s},
        "goodput_rps": res.goodput_rps,
        "bracket": list(res.bracket),
        "converged": res.converged,
        "probes": [
            {
                "rate": p.rate,
                "attainment": p.attainment,
                "attainments": p.attainments,
                "summaries": p.summaries,
            }
            for p in res.probes
        ],
        "best_run": best_run,
    }
    if best_run is not None:
        out.print(f"at {best.rate:.3f} req/s (first run):", highlight=False)
        print_summary(best_run, out)
    note = "" if res.converged else " (not converged: raise --max-probes or widen --low/--high)"
    out.print(
        f"[bold]goodput: {res.goodput_rps:.3f} req/s[/] with >= {slo.attainment:.0%} "
        f"meeting TTFT <= {slo.ttft_s * 1e3:g} ms and TPOT <= {slo.tpot_s * 1e3:g} ms"
        f"{note}",
        highlight=False,
    )
    _save(report, out_dir, plots, "goodput")


@app.command()
def compare(
    a: Annotated[Path, typer.Argument(help="Baseline report.json (A)")],
    b: Annotated[Path, typer.Argument(help="Other report.json (B)")],
    plots_dir: Annotated[
        Path | None, typer.Option("--plots", help="Write overlaid plots of A and B here")
    ] = None,
    labels: Annotated[str, typer.Option("--labels", help="A,B names for plots")] = "A,B",
) -> None:
    """Print B/A ratios of the headline figures of two reports (run or goodput)."""
    from loadgen.report import load, print_compare

    try:
        ra, rb = load(a), load(b)
    except ValueError as e:
        o.fail(str(e))
    names = tuple(labels.split(",", 1)) if "," in labels else ("A", "B")
    print_compare(ra, rb, (f"{names[0]} ({a})", f"{names[1]} ({b})"), out)
    if plots_dir is not None:
        from loadgen import plots as P

        made = P.all_plots([(names[0], ra), (names[1], rb)], plots_dir)
        o.err.print(f"{len(made)} plots in {plots_dir}", highlight=False)


@app.command("sim-server")
def sim_server(
    port: Annotated[int, typer.Option("--port", help="0 picks a free port")] = 0,
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    ttft_ms: Annotated[float, typer.Option("--ttft-ms", help="Prefill time, fixed part")] = 0.0,
    prefill_us_per_token: Annotated[float, typer.Option("--prefill-us-per-token")] = 0.0,
    tpot_ms: Annotated[float, typer.Option("--tpot-ms", help="Time per output token")] = 0.0,
    slots: Annotated[int, typer.Option("--slots", help="Prefill servers; 0: no queue")] = 0,
) -> None:
    """Serve a simulated OpenAI endpoint with a known latency model (to try the generator and
    measure it); prints its base URL."""
    from loadgen.replay import run as run_loop
    from loadgen.sim_server import LatencyModel, serve

    try:
        lat = LatencyModel(ttft_ms / 1e3, prefill_us_per_token / 1e6, tpot_ms / 1e3, slots)
    except ValueError as e:
        o.fail(str(e))
    with contextlib.suppress(KeyboardInterrupt):
        run_loop(serve(lat, host, port, lambda u: print(u, flush=True)))
