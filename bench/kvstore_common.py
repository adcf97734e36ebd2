"""Shared pieces of bench/kvstore.py: configuration, block shapes, timing loops, results and
the helpers that start and stop server processes."""

from __future__ import annotations

import contextlib
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import machine as base_machine
from kvstore.block import CHUNK_BYTES
from rpc.ports import free_port as free_port  # for the tests and benchmarks that import it here

BLOCK_TOKENS = 16  # EngineConfig.block_size
PRESETS = ("tiny", "llama-8b")
MAIN_BLOCK = "llama-8b"  # the block size the summary's ratios are about
MODEL_ID = "bench"
RAW_SERVICE = "bench.RawStream"
MANY_CLIENTS, MANY_SERVERS = 4, 3
_ONE = "1c->1s"
LOOKUP_IDS = 64
BARRIER_TIMEOUT_S = 120.0
START_TIMEOUT_S = 30.0


class BenchError(RuntimeError):
    pass


@dataclass(frozen=True)
class BlockShape:
    name: str
    dtype: str
    shape: tuple[int, ...]  # [L, 2, T, Hkv, D], as services.engine.kv_transfer.KVBlock
    nbytes: int


@dataclass(frozen=True)
class Config:
    min_s: float  # each measurement runs at least this long...
    min_calls: int  # ...and at least this many timed calls
    batch: int  # blocks per put/get call (16 blocks: a 256-token prefix)
    # Per client and measurement. Puts stop here so that no holder ever evicts: each holder's
    # memory (an arena it fills at start) is sized from this, and a put measures storing, not
    # eviction.
    put_cap_bytes: int
    lookups: int
    many_blocks: tuple[str, ...]  # block presets for the 4 -> 3 runs


QUICK = Config(0.8, 3, 16, 256 << 20, 500, (MAIN_BLOCK,))
FULL = Config(2.0, 5, 16, 384 << 20, 5000, PRESETS)


def put_bytes_max(cfg: Config, shape: BlockShape) -> int:
    """The most one put measurement stores: the cap, the call that crosses it and the warm-up."""
    return cfg.put_cap_bytes + 2 * shape.nbytes * cfg.batch


def memory_sizes(cfg: Config, shape: BlockShape) -> tuple[int, int]:
    """Memory tiers for the 1 -> 1 holder and each 4 -> 3 holder: two put measurements (stream,
    shm) of each client that puts there, and room for the tiny blocks."""
    per = put_bytes_max(cfg, shape)
    per_holder = -(-MANY_CLIENTS // MANY_SERVERS)
    return 2 * per + (256 << 20), 2 * per_holder * per + (256 << 20)


@dataclass
class Timing:
    start: float  # time.monotonic(): one clock for every process on the host
    end: float
    calls: int
    blocks: int
    nbytes: int
    latencies: list[float]


@dataclass
class Result:
    scenario: str  # "1c->1s" | "4c->3s" | "local"
    system: str  # splitserve-stream | splitserve-shm | raw-grpc | mooncake-tcp[-batch] | ...
    op: str  # put | get | copy | lookup
    block: str
    block_bytes: int
    clients: int
    calls: int  # timed calls over all clients (a call moves `batch` blocks or looks up 64 ids)
    blocks: int
    bytes: int
    # 1c->1s splitserve and raw-grpc: the sum of the system's own calls (they ran interleaved);
    # 4c->3s: from the first client's start to the last one's end; otherwise the timed calls' span.
    wall_s: float
    gb_s: float
    calls_s: float
    p50_ms: float  # per call
    p99_ms: float


def machine() -> str:
    return base_machine(f"grpcio {grpc.__version__}")


def block_shapes() -> dict[str, BlockShape]:
    from services.model_prep.presets import get_preset  # imports torch: main process only

    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}
    out = {}
    for name in PRESETS:
        p = get_preset(name)
        shape = (p.num_layers, 2, BLOCK_TOKENS, p.num_kv_heads, p.resolved_head_dim)
        out[name] = BlockShape(name, p.dtype, shape, itemsize[p.dtype] * int(np.prod(shape)))
    return out


def payloads(nbytes: int, count: int, seed: int) -> list[memoryview]:
    """`count` distinct payloads (a batch never rereads one block's bytes from cache)."""
    mv = memoryview(np.random.default_rng(seed).bytes(nbytes * count))
    return [mv[i * nbytes : (i + 1) * nbytes] for i in range(count)]


def chunks_of(blocks: list[memoryview]) -> list[bytes]:
    """The data chunks the store's stream transport cuts these blocks into."""
    out = []
    for mv in blocks:
        n = mv.nbytes
        out += [bytes(mv[o : min(o + CHUNK_BYTES, n)]) for o in range(0, max(n, 1), CHUNK_BYTES)]
    return out


# -- timing ---------------------------------------------------------------------------------


def _stop(n: int, elapsed: float, per_call: int, cap: int | None, cfg: Config) -> bool:
    if n < cfg.min_calls:
        return False
    return elapsed >= cfg.min_s or (cap is not None and n * per_call >= cap)


class Op:
    """One kind of call to time: `call(i)` moves one batch of blocks (i < 0: the warm-up)."""

    nbytes = 0  # per call
    blocks = 0  # per call
    cap: int | None = None  # stop once this many bytes went (puts fill the holders)

    async def __aenter__(self) -> Op:
        return self

    async def __aexit__(self, *exc) -> None:
        pass

    async def call(self, i: int) -> None:
        raise NotImplementedError


async def run_alone(op: Op, cfg: Config, barrier=None) -> Timing:
    """Calls back to back; with a barrier, every client process starts its timed calls at once."""
    async with op:
        await op.call(-1)  # warm-up: connections, the index's holder cache, first-touch pages
        if barrier is not None:
            barrier.wait(BARRIER_TIMEOUT_S)
        lat: list[float] = []
        t0 = e = time.monotonic()
        while not _stop(len(lat), e - t0, op.nbytes, op.cap, cfg):
            s = time.monotonic()
            await op.call(len(lat))
            e = time.monotonic()
            lat.append(e - s)
    n = len(lat)
    return Timing(t0, e, n, n * op.blocks, n * op.nbytes, lat)


async def run_interleaved(ops: dict[str, Op], cfg: Config) -> dict[str, Timing]:
    """One call of each op in turn, so that a change in the machine's load (2 cores, shared) hits
    every system alike; each op's time is the sum of its own calls."""
    async with contextlib.AsyncExitStack() as stack:
        for op in ops.values():
            await stack.enter_async_context(op)
            await op.call(-1)
        lat: dict[str, list[float]] = {k: [] for k in ops}
        active = list(ops)
        while active:
            for k in list(active):
                op = ops[k]
                s = time.monotonic()
                await op.call(len(lat[k]))
                lat[k].append(time.monotonic() - s)
                if _stop(len(lat[k]), sum(lat[k]), op.nbytes, op.cap, cfg):
                    active.remove(k)
    out = {}
    for k, op in ops.items():
        n = len(lat[k])
        out[k] = Timing(0.0, sum(lat[k]), n, n * op.blocks, n * op.nbytes, lat[k])
    return out


def timed_sync(
    call: Callable[[int], None],
    cfg: Config,
    per_call_bytes: int,
    per_call_blocks: int,
    cap: int | None = None,
) -> Timing:
    call(-1)
    lat: list[float] = []
    t0 = e = time.monotonic()
    while not _stop(len(lat), e - t0, per_call_bytes, cap, cfg):
        s = time.monotonic()
        call(len(lat))
        e = time.monotonic()
        lat.append(e - s)
    n = len(lat)
    return Timing(t0, e, n, n * per_call_blocks, n * per_call_bytes, lat)


def merge(ts: list[Timing]) -> Timing:
    """Clients that ran at once: their bytes over the span from the first start to the last end."""
    return Timing(
        min(t.start for t in ts),
        max(t.end for t in ts),
        sum(t.calls for t in ts),
        sum(t.blocks for t in ts),
        sum(t.nbytes for t in ts),
        [x for t in ts for x in t.latencies],
    )


def to_result(
    scenario: str, system: str, op: str, shape: BlockShape | None, t: Timing, clients: int = 1
) -> Result:
    wall = t.end - t.start
    lat_ms = np.array(t.latencies) * 1e3
    return Result(
        scenario=scenario,
        system=system,
        op=op,
        block=shape.name if shape else "-",
        block_bytes=shape.nbytes if shape else 0,
        clients=clients,
        calls=t.calls,
        blocks=t.blocks,
        bytes=t.nbytes,
        wall_s=round(wall, 4),
        gb_s=round(t.nbytes / wall / 1e9, 4),
        calls_s=round(t.calls / wall, 1),
        p50_ms=round(float(np.percentile(lat_ms, 50)), 3),
        p99_ms=round(float(np.percentile(lat_ms, 99)), 3),
    )


# -- processes --------------------------------------------------------------------------------


def last_line(log: Path) -> str:
    lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
    return lines[-1] if lines else "no log"


def wait_port(port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{proc.args[0]} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise BenchError(f"nothing listens on port {port} after {START_TIMEOUT_S} s")


def launch(args: list[str], log: Path) -> subprocess.Popen:
    with log.open("ab") as fh:
        return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=fh, text=True)


def address_of(proc: subprocess.Popen, log: Path) -> str:
    """A server's first stdout line is the address it bound."""
    ready, _, _ = select.select([proc.stdout], [], [], START_TIMEOUT_S)
    line = proc.stdout.readline().strip() if ready else ""
    if not line:
        stop_proc(proc)
        tail = log.read_text(errors="replace")[-800:]
        raise BenchError(f"{' '.join(proc.args[:6])} did not start:\n{tail}")
    return line


def stop_proc(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def kv_server_args(redis_url: str, ns: str, holder: str, memory: int) -> list[str]:
    return [
        sys.executable, "-c", "from splitserve.cli import main; main()",
        "serve", "kvstore", "--port", "0", "--redis", redis_url, "--memory", str(memory),
        "--namespace", ns, "--holder-id", holder,
    ]  # fmt: skip
