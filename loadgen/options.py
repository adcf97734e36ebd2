"""The command line's shared options, and what they become: a workload, a prompt factory and
a target (the `run` and `goodput` commands take the same workload options)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

err = Console(stderr=True, soft_wrap=True)


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
    typer.Option(
        "--tenant",
        help="NAME=KEY[:SHARE][@ON_S:OFF_S], repeatable; requests split by share; @: on/off",
    ),
]
SessionsOpt = Annotated[
    str | None,
    typer.Option(
        "--sessions",
        help="TURNS[:THINK_S]: each request starts a conversation of TURNS turns on average",
    ),
]
PrioritiesOpt = Annotated[
    str | None,
    typer.Option(
        "--priorities",
        help="Priority churn: random:FREQ[:LEVELS[:STEP_MS]], markov:... (FREQ per step) or "
        "fixed:P",
    ),
]
PoolTokens = Annotated[
    int | None,
    typer.Option("--pool-tokens", help="Tokens the serving pool holds at once (M): gives VTC's U"),
]
FairWeights = Annotated[
    list[str] | None,
    typer.Option("--fair-weight", help="NAME=W, repeatable: a tenant's share, as the router's"),
]
ServiceWeights = Annotated[
    str, typer.Option("--service-weights", help="IN:OUT service per prompt and output token")
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


def build(opts: dict):
    """(workload, prompt factory, target) from a command's parameters, by their names (the
    command's locals() on entry); fails with exit code 2 and one line on a bad value."""
    from loadgen.arrivals import Arrivals
    from loadgen.churn import PriorityChurn
    from loadgen.prompts import PromptFactory
    from loadgen.readers import read_trace
    from loadgen.runner import Target, Workload, load_tokenizer
    from loadgen.sessions import Sessions
    from loadgen.trace import TraceError
    from loadgen.workload import ReplayConfig, Tenant

    api, prompt_format, trace, arrivals = (
        opts["api"], opts["prompt_format"], opts["trace"], opts["arrivals"]
    )  # fmt: skip
    if api not in ("completions", "chat"):
        fail(f"--api must be completions or chat, got {api!r}")
    if prompt_format not in ("text", "ids"):
        fail(f"--prompt-format must be text or ids, got {prompt_format!r}")
    if api == "chat" and prompt_format == "ids":
        fail("chat requests carry text: use --prompt-format text with --api chat")
    if (trace is None) == (arrivals is None):
        fail("give either --trace (a file or a shipped name) or --arrivals")
    try:
        extra_body = json.loads(opts["extra"]) if opts["extra"] else {}
        if not isinstance(extra_body, dict):
            raise ValueError("not an object")
    except ValueError as e:
        fail(f"--extra must be a JSON object: {e}")
    key = opts["api_key"] or os.environ.get("SPLITSERVE_API_KEY") or ""
    try:
        tenants = tuple(Tenant.parse(t) for t in opts["tenant"] or ()) or (Tenant("default", key),)
        cfg = ReplayConfig(
            speedup=opts.get("speedup", 1.0),
            rate=opts.get("rate"),
            duration_s=opts["duration"],
            max_requests=opts["requests"],
            warmup_s=opts["warmup"],
            max_prompt_tokens=opts["max_prompt_tokens"],
            max_output_tokens=opts["max_output_tokens"],
            length_scale=opts["length_scale"],
            tenants=tenants,
            tenant_by=opts["tenant_by"],
            seed=opts["seed"],
            sessions=Sessions.parse(opts["sessions"]) if opts.get("sessions") else None,
            priorities=(
                PriorityChurn.parse(opts["priorities"], opts["seed"])
                if opts.get("priorities")
                else None
            ),
        )
        if trace is not None:
            kw = {"include_failures": True} if opts["include_failures"] else {}
            work = Workload(cfg, trace=read_trace(trace, opts["fmt"], **kw))
        else:
            lf = opts["lengths_from"]
            work = Workload(
                cfg,
                arrivals=Arrivals.parse(arrivals),
                prompt_len=opts["prompt_len"],
                output_len=opts["output_len"],
                lengths_from=read_trace(lf) if lf else None,
            )
        tok = load_tokenizer(opts["tokenizer"])
        mode = "chat" if api == "chat" else prompt_format
        prompts = PromptFactory(tok, mode, opts["seed"], work.block_tokens)
        target = Target(
            opts["url"], opts["model"], api == "chat", opts["timeout"], opts["ignore_eos"],
            extra_body,
        )  # fmt: skip
    except (TraceError, ValueError) as e:
        fail(str(e))
    if tok is None:
        err.print(
            "[yellow]note:[/] no --tokenizer: prompts use common words, so their token counts "
            "are approximate",
            highlight=False,
        )
    return work, prompts, target


def slo(ttft_ms, tpot_ms, attainment, required: bool):
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


def fair_spec(opts: dict):
    """How the report counts service (the router's fairness section) and the pool size."""
    from loadgen.fairness import FairSpec

    try:
        w_in, w_out = (float(x) for x in opts["service_weights"].split(":"))
    except ValueError:
        fail(f"--service-weights must be IN:OUT, got {opts['service_weights']!r}")
    weights = {}
    for spec in opts["fair_weight"] or ():
        name, _, w = spec.partition("=")
        try:
            weights[name] = float(w)
        except ValueError:
            fail(f"--fair-weight must be NAME=W, got {spec!r}")
    try:
        return FairSpec(w_in, w_out, weights, opts["pool_tokens"])
    except ValueError as e:
        fail(str(e))
