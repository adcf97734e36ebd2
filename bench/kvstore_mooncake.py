"""Mooncake Store over TCP, the peer bench/kvstore.py measures against: a master, a store
process that holds the memory, and a client process doing plain put/get of the same blocks."""

from __future__ import annotations

import contextlib
import importlib.util
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.kvstore_common import (
    BARRIER_TIMEOUT_S,
    START_TIMEOUT_S,
    BenchError,
    BlockShape,
    Config,
    Timing,
    free_port,
    last_line,
    payloads,
    put_bytes_max,
    stop_proc,
    timed_sync,
    wait_port,
)

# -- Mooncake Store (peer) ------------------------------------------------------------------


def _to_log(path: str) -> None:
    """Send this process's stdout and stderr (Mooncake logs through glog) to a file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _mooncake_store(host: str, metadata: str, master: str, segment: int, buffer: int):
    from mooncake.store import MooncakeDistributedStore

    store = MooncakeDistributedStore()
    rc = store.setup(host, metadata, segment, buffer, "tcp", "", master)
    if rc != 0:
        raise BenchError(f"MooncakeDistributedStore.setup returned {rc}")
    return store


def _mooncake_holder(conn, host, metadata, master, segment, log) -> None:
    """The server side: a store process that contributes memory and holds the objects."""
    _to_log(log)
    try:
        store = _mooncake_store(host, metadata, master, segment, 16 << 20)
    except Exception as e:
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", None))
    conn.recv()
    store.close()


def _mooncake_client(conn, host, metadata, master, nbytes, cfg, log) -> None:
    """The client side: no memory of its own, so every put and get crosses TCP to the holder."""
    _to_log(log)
    try:
        # The staging buffer must take a whole batch (put_batch/get_batch).
        store = _mooncake_store(host, metadata, master, 0, 2 * nbytes * cfg.batch + (64 << 20))
        data = payloads(nbytes, cfg.batch, seed=11)
        total = nbytes * cfg.batch
        keys: list[str] = []

        def put(i: int) -> None:
            keys[:] = [uuid.uuid4().hex for _ in data]
            for k, p in zip(keys, data, strict=True):
                if (rc := store.put(k, p)) != 0:
                    raise BenchError(f"mooncake put returned {rc}")

        def get(i: int) -> None:
            for k in keys:
                if len(store.get(k)) != nbytes:
                    raise BenchError(f"mooncake get of {k}: wrong size")

        def put_batch(i: int) -> None:
            keys[:] = [uuid.uuid4().hex for _ in data]
            if (rc := store.put_batch(keys, data)) != 0:
                raise BenchError(f"mooncake put_batch returned {rc}")

        def get_batch(i: int) -> None:
            if [len(b) for b in store.get_batch(keys)] != [nbytes] * len(keys):
                raise BenchError("mooncake get_batch: wrong sizes")

        out = {"put": timed_sync(put, cfg, total, cfg.batch, cfg.put_cap_bytes)}
        if store.get(keys[0]) != bytes(data[0]):
            raise BenchError("mooncake returned different bytes than were put")
        out["get"] = timed_sync(get, cfg, total, cfg.batch)
        out["put_batch"] = timed_sync(put_batch, cfg, total, cfg.batch, cfg.put_cap_bytes)
        out["get_batch"] = timed_sync(get_batch, cfg, total, cfg.batch)
        store.close()
        conn.send(("ok", out))
    except Exception as e:
        conn.send(("error", f"{type(e).__name__}: {e}"))


def mooncake_master_binary() -> str | None:
    found = shutil.which("mooncake_master") or str(
        Path(sys.executable).with_name("mooncake_master")
    )
    return found if os.access(found, os.X_OK) else None


def run_mooncake(shape: BlockShape, cfg: Config, logdir: Path) -> dict[str, Timing] | str:
    """Mooncake's numbers, or why there are none."""
    binary = mooncake_master_binary()
    if importlib.util.find_spec("mooncake") is None or binary is None:
        return "not installed (pip install '.[bench]')"
    rpc, http, metrics, holder_port, client_port = (free_port() for _ in range(5))
    master_addr, metadata = f"127.0.0.1:{rpc}", f"http://127.0.0.1:{http}/metadata"
    log = logdir / "mooncake.log"
    with log.open("ab") as fh:
        master = subprocess.Popen(
            [binary, f"--rpc_port={rpc}", "--rpc_address=127.0.0.1",
             "--enable_http_metadata_server=true", "--http_metadata_server_host=127.0.0.1",
             f"--http_metadata_server_port={http}", f"--metrics_port={metrics}",
             "--enable_metric_reporting=false"],
            stdout=fh, stderr=fh,
        )  # fmt: skip
    # The segment takes both put measurements (no eviction during a put) and a margin.
    segment = 2 * put_bytes_max(cfg, shape) + (256 << 20)
    ctx = mp.get_context("spawn")
    holder_conn, child = ctx.Pipe()
    holder = ctx.Process(
        target=_mooncake_holder,
        args=(child, f"127.0.0.1:{holder_port}", metadata, master_addr, segment, str(log)),
        daemon=True,
    )
    client = None
    try:
        for port in (rpc, http):
            wait_port(port, master)
        holder.start()
        if not holder_conn.poll(START_TIMEOUT_S):
            return f"its store process did not start ({last_line(log)})"
        status, why = holder_conn.recv()
        if status != "ready":
            return f"failed to start: {why}"
        conn, child = ctx.Pipe()
        client = ctx.Process(
            target=_mooncake_client,
            args=(child, f"127.0.0.1:{client_port}", metadata, master_addr, shape.nbytes, cfg,
                  str(log)),
            daemon=True,
        )  # fmt: skip
        client.start()
        if not conn.poll(BARRIER_TIMEOUT_S):
            return f"its client did not finish ({last_line(log)})"
        status, out = conn.recv()
        return out if status == "ok" else f"failed: {out}"
    except (BenchError, OSError, EOFError) as e:
        return f"failed: {e}"
    finally:
        with contextlib.suppress(OSError):
            holder_conn.send(None)
        for p in (client, holder):
            if p is not None and p.pid is not None:
                p.join(timeout=5)
                if p.is_alive():
                    p.kill()
        stop_proc(master)
