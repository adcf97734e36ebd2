"""`splitserve serve ...`: one service in the foreground (a KV store, a prefill, decode,
colocated or attention replica), printing its address once it serves."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from pathlib import Path
from typing import Annotated

import typer

from splitserve.cli_common import DtypeOpt, ModelOpt, err, fail, resolve_model

serve_app = typer.Typer(help="Run one splitserve service in the foreground.", no_args_is_help=True)


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
    offload_workers: int = 0,
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
    needs_redis = (
        role != "colocated" or redis_url is not None or borrow_kv or lend_fraction > 0
        or offload_workers > 0
    )  # fmt: skip
    with (
        _cluster_redis(config.cluster)
        if needs_redis
        else contextlib.nullcontext(config.cluster) as cluster
    ):
        config = dataclasses.replace(config, cluster=cluster)
        if role != "prefill":  # a prefill replica neither borrows nor lends
            try:
                engine = dataclasses.replace(config.engine, kv_offload=offload_workers > 0)
                config = dataclasses.replace(
                    config, borrow_kv=borrow_kv, lend_fraction=lend_fraction,
                    offload_workers=offload_workers, engine=engine,
                )  # fmt: skip
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
        offload_workers: Annotated[
            int,
            typer.Option(
                "--offload-workers",
                help="Attention offload: a model worker with no KV; this many attention workers "
                "(serve attention --offload) hold its --num-kv-blocks blocks by KV head",
            ),
        ] = 0,
    ) -> None:
        _serve_engine_service(
            role, model, dtype, host, port, redis_url, namespace, max_waiting, kv_memory,
            num_kv_blocks, metrics_port, device, device_pool, borrow_kv, lend_fraction,
            offload_workers,
        )  # fmt: skip

    command.__doc__ = doc
    # A prefill replica's pool only hands KV off: it borrows none. Only a colocated replica
    # can be an offload model worker (it takes whole requests).
    hidden = {"prefill": ("borrow_kv", "lend_fraction", "offload_workers"),
              "decode": ("offload_workers",)}.get(role, ())  # fmt: skip
    if hidden:
        sig = inspect.signature(command, eval_str=True)  # typer reads the options from these
        command.__signature__ = sig.replace(  # type: ignore[attr-defined]
            parameters=[p for p in sig.parameters.values() if p.name not in hidden]
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
    offload: Annotated[
        bool,
        typer.Option(
            "--offload/--lend",
            help="Hold KV heads of offload model workers' pools (serve colocated "
            "--offload-workers) instead of lending blocks to decoders",
        ),
    ] = False,
) -> None:
    """Attention service: a KV pool (no weights) lent to decode replicas started with
    --borrow-kv, attending over what they borrowed; or, with --offload, memory for the KV heads
    of model workers that hold none. Prints its address."""
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
            offload=offload,
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
            if server.offload is not None:
                mib = server.offload.budget_bytes / 2**20
                what = f"{mib:.0f} MiB for offload model workers' KV heads"
            else:
                h = server.holder
                what = f"{h.capacity} KV blocks, {h.lend_cap} lendable"
            err.print(f"attention replica {server.holder_id}: {what}", highlight=False)
            if server.metrics_address:
                err.print(f"metrics at http://{server.metrics_address}/metrics", highlight=False)

        _serve(server.start, server.stop, announce)
