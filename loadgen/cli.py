"""`splitserve bench`: replay a trace or a synthetic workload against an OpenAI-compatible or
splitserve gRPC endpoint, and report latency, SLO attainment, goodput and tenant fairness.

Heavy imports (numpy, matplotlib, grpc, the tokenizer) happen inside commands so `--help`
stays instant.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(
    help="Load generator: replay traces, measure SLO attainment, goodput and fairness.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)


def fail(msg: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {msg}", highlight=False)
    raise typer.Exit(code)


Url = Annotated[
    str, typer.Option("--url", help="http(s)://HOST:PORT/v1 (OpenAI) or grpc://HOST:PORT")
]
Model = Annotated[str, typer.Option("--model", help="Model name sent with each request")]
Api = Annotated[str, typer.Option("--api", help="completions | chat")]
PromptFormat = Annotated[
    str, typer.Option("--prompt-format", help="text | ids (token ids; completions and gRPC only)")
]
TokenizerOpt = Annotated[
    str | None,
    typer.Option("--tokenizer", help="Model DIR or cached name, for exact-length prompts"),
]
TraceOpt = Annotated[
    str | None,
    typer.Option(
        "--trace",
        help="PATH, or shipped: azure-conv, azure-code, mooncake-conversation, mooncake-synthetic",
    ),
]
FormatOpt = Annotated[
    str | None, typer.Option("--format", help="burstgpt | azure | mooncake (default: sniffed)")
]
ArrivalsOpt = Annotated[
    str | None,
    typer.Option("--arrivals", help="Synthetic: fixed:R, poisson:R, gamma:R:CV, onoff:R:ON:OFF"),
]
LENGTHS = "fixed:N, uniform:LO:HI or zipf:A:LO:HI"
PromptLen = Annotated[str, typer.Option("--prompt-len", help=LENGTHS)]
OutputLen = Annotated[str, typer.Option("--output-len", help=LENGTHS)]
LengthsFrom = Annotated[
    str | None, typer.Option("--lengths-from", help="Resample (prompt, output) pairs of a trace")
]
Speedup = Annotated[float, typer.Option("--speedup", help="Divide trace times by this")]
Rate = Annotated[float | None, typer.Option("--rate", help="Scale the trace to this mean req/s")]
Duration = Annotated[float | None, typer.Option("--duration", help="Stop scheduling after S s")]
Requests = Annotated[int | None, typer.Option("--requests", help="Send at most N requests")]
Warmup = Annotated[float, typer.Option("--warmup", help="Leave the first S s out of results")]
MaxPrompt = Annotated[int | None, typer.Option("--max-prompt-tokens", help="Cap prompt lengths")]
MaxOutput = Annotated[int | None, typer.Option("--max-output-tokens", help="Cap output lengths")]
LengthScale = Annotated[
    float, typer.Option("--length-scale", help="Multiply lengths (and prefix blocks) by this")
]
Tenants = Annotated[
    list[str] | None,
    typer.Option("--tenant", help="NAME=KEY[:SHARE], repeatable; requests split by share"),
]
TenantBy = Annotated[
    str | None, typer.Option("--tenant-by", help="Assign by trace label (model, log_type)")
]
ApiKey = Annotated[
    str | None, typer.Option("--api-key", help="One tenant's key (default: $SPLITSERVE_API_KEY)")
]
SloTtft = Annotated[float | None, typer.Option("--slo-ttft", help="TTFT SLO in ms")]
SloTpot = Annotated[float | None, typer.Option("--slo-tpot", help="TPOT SLO in ms")]
Attain = Annotated[float, typer.Option("--attainment", help="Share that must meet both SLOs")]
Seed = Annotated[int, typer.Option("--seed")]
Timeout = Annotated[float, typer.Option("--timeout", help="Per-request timeout (s)")]
Conns = Annotated[int, typer.Option("--connections", help="HTTP connections opened up front")]
IgnoreEos = Annotated[
    bool, typer.Option("--ignore-eos/--no-ignore-eos", help="Ask for exactly the planned output")
]
Extra = Annotated[str | None, typer.Option("--extra", help="JSON merged into each HTTP body")]
OutDir = Annotated[Path | None, typer.Option("--out", help="Write report.json and PNG plots here")]
Window = Annotated[float | None, typer.Option("--window", help="Timeline window (s)")]
Failures = Annotated[
    bool, typer.Option("--include-failures", help="BurstGPT: keep rows with 0 response tokens")
]
Quiet = Annotated[bool, typer.Option("--quiet", help="No progress bar")]


def _setup(
    url,
    model,
    api,
    prompt_format,
    tokenizer,
    trace,
    fmt,
    arrivals,
    prompt_len,
    output_len,
    lengths_from,
    speedup,
    rate,
    duration,
    requests,
    warmup,
    max_prompt,
    max_output,
    length_scale,
    tenants,
    tenant_by,
    api_key,
    seed,
    timeout,
    ignore_eos,
    extra,
    failures,
):
    from loadgen.arrivals import Arrivals
    from loadgen.prompts import PromptFactory
    from loadgen.readers import read_trace
    from loadgen.runner import Target, Workload, load_tokenizer
    from loadgen.trace import TraceError
    from loadgen.workload import ReplayConfig, Tenant

    if api not in ("completions", "chat"):
        fail(f"--api must be completions or chat, got {api!r}")
    if prompt_format not in ("text", "ids"):
        fail(f"--prompt-format must be text or ids, got {prompt_format!r}")
    if api == "chat" and prompt_format == "ids":
        fail("chat requests carry text: use --prompt-format text with --api chat")
    try:
        extra_body = json.loads(extra) if extra else {}
        if not isinstance(extra_body, dict):
            raise ValueError("not an object")
    except ValueError as e:
        fail(f"--extra must be a JSON object: {e}")
    try:
        key = api_key or os.environ.get("SPLITSERVE_API_KEY") or os.environ.get("OPENAI_API_KEY")
        ts = tuple(Tenant.parse(t) for t in tenants) if tenants else (Tenant("default", key or ""),)
        cfg = ReplayConfig(
            speedup,
            rate,
            duration,
            requests,
            warmup,
            max_prompt,
            max_output,
            length_scale,
            ts,
            tenant_by,
            seed,
        )
        if trace is not None and arrivals is not None:
            fail("give --trace or --arrivals, not both")
        if trace is None and arrivals is None:
            fail("give --trace (a file or a shipped name) or --arrivals")
        kw = {"include_failures": True} if failures else {}
        if trace is not None:
            work = Workload(cfg, trace=read_trace(trace, fmt, **kw))
        else:
            lf = read_trace(lengths_from) if lengths_from else None
            work = Workload(
                cfg,
                arrivals=Arrivals.parse(arrivals),
                prompt_len=prompt_len,
                output_len=output_len,
                lengths_from=lf,
            )
        tok = load_tokenizer(tokenizer)
        mode = "chat" if api == "chat" else prompt_format
        prompts = PromptFactory(tok, mode, seed, work.block_tokens)
        target = Target(url, model, api == "chat", timeout, ignore_eos, extra_body)
    except (TraceError, ValueError) as e:
        fail(str(e))
    if tok is None:
        err.print(
            "[yellow]note:[/] no --tokenizer: prompts use common words, so their token counts "
            "are approximate",
            highlight=False,
        )
    return work, prompts, target


def _slo(ttft_ms, tpot_ms, attainment, required: bool):
    from loadgen.metrics import SLO

    if ttft_ms is None and tpot_ms is None:
        if required:
            fail("goodput needs --slo-ttft and --slo-tpot (ms)")
        return None
    if ttft_ms is None or tpot_ms is None:
        fail("give both --slo-ttft and --slo-tpot")
    try:
        return SLO(ttft_ms / 1e3, tpot_ms / 1e3, attainment)
    except ValueError as e:
        fail(str(e))


async def _with_progress(coro, prog, label: str, quiet: bool):
    """Runs `coro`, showing `prog`'s counts in a progress bar (refreshed 5 times a second, so
    the display never competes with the schedule)."""
    if quiet or not err.is_terminal:
        return await coro
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("sent {task.fields[sent]}, errors {task.fields[errors]}"),
        TimeElapsedColumn(),
        console=err,
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
    err.print(
        f"report: {out_dir / 'report.json'}" + (f"; {len(made)} plots" if made else ""),
        highlight=False,
    )


@app.command()
def run(
    url: Url = "http://127.0.0.1:8000/v1",
    model: Model = "smollm2-135m-instruct",
    api: Api = "completions",
    prompt_format: PromptFormat = "text",
    tokenizer: TokenizerOpt = None,
    trace: TraceOpt = None,
    fmt: FormatOpt = None,
    arrivals: ArrivalsOpt = None,
    prompt_len: PromptLen = "fixed:128",
    output_len: OutputLen = "fixed:128",
    lengths_from: LengthsFrom = None,
    speedup: Speedup = 1.0,
    rate: Rate = None,
    duration: Duration = None,
    requests: Requests = None,
    warmup: Warmup = 0.0,
    max_prompt_tokens: MaxPrompt = None,
    max_output_tokens: MaxOutput = None,
    length_scale: LengthScale = 1.0,
    tenant: Tenants = None,
    tenant_by: TenantBy = None,
    api_key: ApiKey = None,
    slo_ttft: SloTtft = None,
    slo_tpot: SloTpot = None,
    attainment: Attain = 0.9,
    seed: Seed = 0,
    timeout: Timeout = 600.0,
    connections: Conns = 32,
    ignore_eos: IgnoreEos = True,
    extra: Extra = None,
    out_dir: OutDir = None,
    plots: Annotated[bool, typer.Option("--plots/--no-plots")] = True,
    window: Window = None,
    include_failures: Failures = False,
    quiet: Quiet = False,
) -> None:
    """Replay once (open loop) and print the summary; --out DIR writes report.json and plots."""
    from loadgen.replay import Progress
    from loadgen.replay import run as run_loop
    from loadgen.report import print_summary, run_report
    from loadgen.runner import execute

    work, prompts, target = _setup(
        url,
        model,
        api,
        prompt_format,
        tokenizer,
        trace,
        fmt,
        arrivals,
        prompt_len,
        output_len,
        lengths_from,
        speedup,
        rate,
        duration,
        requests,
        warmup,
        max_prompt_tokens,
        max_output_tokens,
        length_scale,
        tenant,
        tenant_by,
        api_key,
        seed,
        timeout,
        ignore_eos,
        extra,
        include_failures,
    )
    slo = _slo(slo_ttft, slo_tpot, attainment, required=False)
    try:
        planned = work.planned(prompts)
    except ValueError as e:
        fail(str(e))
    if not planned:
        fail("the workload has no requests within the caps given")
    prog = Progress(len(planned))
    try:
        result = run_loop(
            _with_progress(
                execute(target, planned, connections, prog), prog, f"{len(planned)} requests", quiet
            )
        )
    except OSError as e:
        fail(f"cannot reach {url}: {e}", 1)
    report = run_report(result, _config(work, target, prompts, connections), slo, window)
    print_summary(report, out)
    _save(report, out_dir, plots, "run")
    if report["summary"]["completed"] == 0:
        fail("no request completed", 1)


@app.command()
def goodput(
    url: Url = "http://127.0.0.1:8000/v1",
    model: Model = "smollm2-135m-instruct",
    api: Api = "completions",
    prompt_format: PromptFormat = "text",
    tokenizer: TokenizerOpt = None,
    trace: TraceOpt = None,
    fmt: FormatOpt = None,
    arrivals: ArrivalsOpt = None,
    prompt_len: PromptLen = "fixed:128",
    output_len: OutputLen = "fixed:128",
    lengths_from: LengthsFrom = None,
    duration: Duration = None,
    requests: Requests = None,
    warmup: Warmup = 0.0,
    max_prompt_tokens: MaxPrompt = None,
    max_output_tokens: MaxOutput = None,
    length_scale: LengthScale = 1.0,
    tenant: Tenants = None,
    tenant_by: TenantBy = None,
    api_key: ApiKey = None,
    slo_ttft: SloTtft = None,
    slo_tpot: SloTpot = None,
    attainment: Attain = 0.9,
    low: Annotated[float, typer.Option("--low", help="Lowest rate to try (req/s)")] = 0.5,
    high: Annotated[float, typer.Option("--high", help="First upper rate to try (req/s)")] = 8.0,
    repeats: Annotated[int, typer.Option("--repeats", help="Runs per probed rate")] = 2,
    tolerance: Annotated[float, typer.Option("--tolerance", help="Relative bracket width")] = 0.05,
    max_probes: Annotated[int, typer.Option("--max-probes")] = 16,
    seed: Seed = 0,
    timeout: Timeout = 600.0,
    connections: Conns = 32,
    ignore_eos: IgnoreEos = True,
    extra: Extra = None,
    out_dir: OutDir = None,
    plots: Annotated[bool, typer.Option("--plots/--no-plots")] = True,
    window: Window = None,
    include_failures: Failures = False,
    quiet: Quiet = False,
) -> None:
    """Find the highest rate meeting both SLOs for --attainment of requests (bisection over the
    rate, --repeats runs per rate). Trace times are scaled to each rate; synthetic arrivals are
    regenerated at it. Cap each run with --requests or --duration."""
    from loadgen.goodput import search
    from loadgen.replay import Progress
    from loadgen.replay import run as run_loop
    from loadgen.report import print_summary, run_report
    from loadgen.runner import execute

    work, prompts, target = _setup(
        url,
        model,
        api,
        prompt_format,
        tokenizer,
        trace,
        fmt,
        arrivals,
        prompt_len,
        output_len,
        lengths_from,
        1.0,
        None,
        duration,
        requests,
        warmup,
        max_prompt_tokens,
        max_output_tokens,
        length_scale,
        tenant,
        tenant_by,
        api_key,
        seed,
        timeout,
        ignore_eos,
        extra,
        include_failures,
    )
    slo = _slo(slo_ttft, slo_tpot, attainment, required=True)
    config = _config(work, target, prompts, connections)
    reports: dict[tuple[float, int], dict] = {}

    async def measure(rate: float, k: int) -> dict:
        planned = work.planned(prompts, rate, k)
        if not planned:
            raise ValueError(f"no requests at rate {rate:g} within the caps")
        prog = Progress(len(planned))
        res = await _with_progress(
            execute(target, planned, connections, prog), prog, f"{rate:.3g} req/s #{k + 1}", quiet
        )
        rep = run_report(res, config | {"rate": rate, "repeat": k}, slo, window)
        reports[(rate, k)] = rep
        return rep["summary"]

    def shown(p) -> None:
        att = ", ".join(f"{a:.1%}" for a in p.attainments)
        verdict = "pass" if p.attainment >= slo.attainment else "fail"
        out.print(f"rate {p.rate:8.3f} req/s: attainment {att} -> {verdict}", highlight=False)

    try:
        res = run_loop(
            search(measure, slo.attainment, low, high, repeats, tolerance, max_probes, shown)
        )
    except ValueError as e:
        fail(str(e))
    except OSError as e:
        fail(f"cannot reach {url}: {e}", 1)
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
        fail(str(e))
    names = tuple(labels.split(",", 1)) if "," in labels else ("A", "B")
    print_compare(ra, rb, (f"{names[0]} ({a})", f"{names[1]} ({b})"), out)
    if plots_dir is not None:
        from loadgen import plots as P

        made = P.all_plots([(names[0], ra), (names[1], rb)], plots_dir)
        err.print(f"{len(made)} plots in {plots_dir}", highlight=False)


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
        fail(str(e))
    with contextlib.suppress(KeyboardInterrupt):
        run_loop(serve(lat, host, port, lambda u: print(u, flush=True)))
