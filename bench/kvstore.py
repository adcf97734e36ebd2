"""KV block store throughput and index latency, against a raw gRPC stream, memcpy and Mooncake.

Blocks are real KV blocks: 16 tokens of [layers, K and V, tokens, KV heads, head_dim] for the tiny
preset (float32, 8 KiB) and for Llama-3.1-8B (bfloat16, 2 MiB); a call puts or gets 16 of them.
Every server runs in its own process, as in a deployment, so client and server never share a
Python thread:

- 1 client -> 1 server and 4 client processes -> 3 servers, put and get, with the bytes inside the
  gRPC stream ("stream", what a client on another host gets) and through the holder's shared
  memory ("shm", a client on the holder's host);
- the ceiling: a bare grpc.aio stream (no protobuf, no store, no checksum) of the same bytes in
  the same chunk sizes, on the same loopback, from the same client processes. Its server drops
  each chunk it receives (a store copies it into memory of its own); its client keeps the chunks
  to the end of the call, as a get must hand them over ("raw-grpc-drop": dropped at once, a
  reference point only). For 1 -> 1 the raw stream and both store paths run interleaved, call
  by call, so that the load of a shared 2-core machine shifts all of them alike;
- a plain memcpy of the same bytes, the yardstick for the shared-memory get (and a copy into new
  buffers, the least any get that returns fresh objects pays);
- Redis index lookups of 64 ids (what every get and put starts with);
- Mooncake Store over TCP moving the same 2 MiB blocks: a store process that holds the data, a
  client process with no memory of its own, plain put/get and put_batch/get_batch
  (`pip install '.[bench]'`; skipped, and said so, where it is not installed).

    python bench/kvstore.py [--quick] [--json PATH]

GB/s are 1e9 bytes a second. Summary: get_ratio_to_raw / put_ratio_to_raw are the stream path
over the raw stream (1 -> 1, 2 MiB blocks); shm_ratio_to_memcpy is the shared-memory get over
memcpy; lookup_p99_ms; get_ratio_to_mooncake is the stream get over Mooncake's TCP get.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.kvstore_common import (
    _ONE,
    BARRIER_TIMEOUT_S,
    FULL,
    LOOKUP_IDS,
    MAIN_BLOCK,
    MANY_CLIENTS,
    MANY_SERVERS,
    PRESETS,
    QUICK,
    START_TIMEOUT_S,
    BenchError,
    BlockShape,
    Config,
    Op,
    Result,
    address_of,
    block_shapes,
    kv_server_args,
    launch,
    machine,
    memory_sizes,
    merge,
    run_alone,
    run_interleaved,
    stop_proc,
    to_result,
)
from bench.kvstore_mooncake import run_mooncake
from bench.kvstore_ops import KVGet, KVPut, lookups, memcpy
from bench.kvstore_raw import RawGet, RawPut
from kvstore.redis_server import EmbeddedRedis

RAW_SERVER = str(Path(__file__).with_name("kvstore_raw.py"))


# -- client processes for the 4 -> 3 runs ---------------------------------------------------

_OPS = {op.__name__: op for op in (RawPut, RawGet, KVPut, KVGet)}


def _client_worker(conn, barrier) -> None:
    """A spawned client process: runs ops for the bench until it sends None. Replies with the
    timing and, for puts, the newest ids."""
    import traceback

    loop = asyncio.new_event_loop()
    conn.send(("ready", None))
    while (cmd := conn.recv()) is not None:
        name, cfg, kwargs = cmd
        try:
            op = _OPS[name](cfg=cfg, **kwargs)
            t = loop.run_until_complete(run_alone(op, cfg, barrier))
            conn.send(("ok", (t, getattr(op, "ids", None))))
        except Exception as e:
            conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}"))
    loop.close()


class ClientPool:
    def __init__(self, n: int) -> None:
        ctx = mp.get_context("spawn")  # a fork would copy the parent's gRPC state
        self.barrier = ctx.Barrier(n)
        self.conns, self.procs = [], []
        for _ in range(n):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_client_worker, args=(child, self.barrier), daemon=True)
            p.start()
            self.conns.append(parent)
            self.procs.append(p)

    def _recv(self, conn, timeout: float):
        if not conn.poll(timeout):
            raise BenchError("a client process did not answer")
        return conn.recv()

    def wait_ready(self) -> None:
        for c in self.conns:
            self._recv(c, START_TIMEOUT_S)

    async def run(self, commands: list[tuple[str, Config, dict]]) -> list:
        for c, cmd in zip(self.conns, commands, strict=True):
            c.send(cmd)
        tasks = [
            asyncio.ensure_future(asyncio.to_thread(self._recv, c, BARRIER_TIMEOUT_S * 2))
            for c in self.conns
        ]
        for fut in asyncio.as_completed(tasks):
            status, out = await fut
            if status != "ok":
                self.barrier.abort()  # the others may be waiting for this one
                await asyncio.gather(*tasks, return_exceptions=True)
                raise BenchError(f"client process failed: {out}")
        return [t.result()[1] for t in tasks]

    def close(self) -> None:
        for c in self.conns:
            with contextlib.suppress(OSError):
                c.send(None)
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()


# -- the run ----------------------------------------------------------------------------------


def report(r: Result) -> None:
    rate = f"{r.gb_s:7.3f} GB/s" if r.bytes else f"{r.calls_s:7.0f} /s  "
    print(
        f"{r.scenario:>7} {r.block:>8} {r.system:>19} {r.op:>6}: {rate}  "
        f"p50 {r.p50_ms:8.3f} ms  p99 {r.p99_ms:8.3f} ms  "
        f"({r.calls} calls, {r.clients} client{'s' if r.clients > 1 else ''}, {r.wall_s:.2f} s)",
        flush=True,
    )


async def bench(cfg: Config, shapes: dict[str, BlockShape], logdir: Path) -> tuple[list, str]:
    results: list[Result] = []

    def add(*args, **kwargs) -> None:
        r = to_result(*args, **kwargs)
        results.append(r)
        report(r)

    main = shapes[MAIN_BLOCK]
    # Mooncake first and alone: its processes start before this one opens any gRPC channel, and
    # its holder's memory is given back before our holders take theirs.
    mc = run_mooncake(main, cfg, logdir)
    if isinstance(mc, str):
        mooncake = f"mooncake: {mc}, skipped"
        print(mooncake, flush=True)
    else:
        mooncake = "mooncake: measured"
        for key, system in (("", "mooncake-tcp"), ("_batch", "mooncake-tcp-batch")):
            add(_ONE, system, "put", main, mc[f"put{key}"])
            add(_ONE, system, "get", main, mc[f"get{key}"])

    tag = uuid.uuid4().hex[:6]
    one_ns, many_ns = f"bench-{tag}-1s", f"bench-{tag}-3s"
    mem_one, mem_many = memory_sizes(cfg, main)
    servers: list[tuple[subprocess.Popen, Path]] = []
    pool = None
    with EmbeddedRedis() as redis_srv:
        url = redis_srv.url
        try:
            # Every process starts at once, before any measurement.
            for name, ns, memory in [("kv1-0", one_ns, mem_one)] + [
                (f"kv3-{i}", many_ns, mem_many) for i in range(MANY_SERVERS)
            ]:
                args = kv_server_args(url, ns, f"{ns}-h{name[-1]}", memory)
                servers.append((launch(args, logdir / f"{name}.log"), logdir / f"{name}.log"))
            for i in range(MANY_SERVERS):
                log = logdir / f"raw-{i}.log"
                servers.append((launch([sys.executable, RAW_SERVER], log), log))
            pool = ClientPool(MANY_CLIENTS)
            addresses = [address_of(p, log) for p, log in servers]
            raw = addresses[-MANY_SERVERS:]
            pool.wait_ready()

            # 1 client (this process) -> 1 server, the systems interleaved call by call.
            for name in PRESETS:
                shape = shapes[name]
                puts = {
                    "raw-grpc": RawPut(raw[0], shape, cfg, seed=1),
                    "splitserve-stream": KVPut(url, one_ns, False, shape, cfg, seed=1),
                    "splitserve-shm": KVPut(url, one_ns, True, shape, cfg, seed=2),
                }
                for system, t in (await run_interleaved(puts, cfg)).items():
                    add(_ONE, system, "put", shape, t)
                gets: dict[str, Op] = {
                    "raw-grpc": RawGet(raw[0], shape, cfg),
                    "raw-grpc-drop": RawGet(raw[0], shape, cfg, keep=False),
                }
                for system, shm in (("splitserve-stream", False), ("splitserve-shm", True)):
                    ids = puts[system].ids[-cfg.batch :]
                    gets[system] = KVGet(url, one_ns, shm, shape, ids, cfg)
                for system, t in (await run_interleaved(gets, cfg)).items():
                    add(_ONE, system, "get", shape, t)
            add("local", "memcpy", "copy", main, memcpy(main, cfg))
            add("local", "memcpy-new-buffers", "copy", main, memcpy(main, cfg, fresh=True))
            ids = puts["splitserve-stream"].ids
            add("local", "redis-index", "lookup", None, await lookups(url, one_ns, ids, cfg))

            # 4 client processes -> 3 servers, one system at a time: aggregate GB/s over the
            # clients' common span.
            clients = range(MANY_CLIENTS)
            for name in cfg.many_blocks:
                shape = shapes[name]
                raws = [dict(address=raw[i % MANY_SERVERS], shape=shape) for i in clients]
                out = await pool.run([("RawPut", cfg, dict(**r, seed=100 + i))
                                      for i, r in enumerate(raws)])  # fmt: skip
                add("4c->3s", "raw-grpc", "put", shape, merge([t for t, _ in out]), MANY_CLIENTS)
                out = await pool.run([("RawGet", cfg, r) for r in raws])
                add("4c->3s", "raw-grpc", "get", shape, merge([t for t, _ in out]), MANY_CLIENTS)
                for system, shm in (("splitserve-stream", False), ("splitserve-shm", True)):
                    kv = dict(redis_url=url, ns=many_ns, shm=shm, shape=shape)
                    out = await pool.run(
                        [("KVPut", cfg, dict(**kv, seed=100 + i,
                                             holder=f"{many_ns}-h{i % MANY_SERVERS}"))
                         for i in clients]
                    )  # fmt: skip
                    add("4c->3s", system, "put", shape, merge([t for t, _ in out]), MANY_CLIENTS)
                    # Each client reads a quarter of everyone's newest blocks: its batches span
                    # the three holders, so one get fans out to several.
                    newest = [b for _, ids in out for b in ids[-cfg.batch :]]
                    newest = [newest[j] for j in np.random.default_rng(5).permutation(len(newest))]
                    out = await pool.run(
                        [("KVGet", cfg, dict(**kv, ids=newest[i::MANY_CLIENTS])) for i in clients]
                    )
                    add("4c->3s", system, "get", shape, merge([t for t, _ in out]), MANY_CLIENTS)
        finally:
            if pool is not None:
                pool.close()
            for p, _ in servers:
                stop_proc(p)
    return results, mooncake


def find(results: list[Result], scenario: str, system: str, op: str, block: str = MAIN_BLOCK):
    for r in results:
        if (r.scenario, r.system, r.op, r.block) == (scenario, system, op, block):
            return r
    return None


def ratio(a: Result | None, b: Result | None) -> float | None:
    return round(a.gb_s / b.gb_s, 3) if a and b and b.gb_s else None


# summary key, (numerator row), (denominator row), goal: ratios of GB/s, 2 MiB blocks.
RATIOS = (
    ("get_ratio_to_raw", (_ONE, "splitserve-stream", "get"), (_ONE, "raw-grpc", "get"), 0.8),
    ("put_ratio_to_raw", (_ONE, "splitserve-stream", "put"), (_ONE, "raw-grpc", "put"), 0.8),
    ("shm_ratio_to_memcpy", (_ONE, "splitserve-shm", "get"), ("local", "memcpy", "copy"), 0.5),
    ("get_ratio_to_mooncake", (_ONE, "splitserve-stream", "get"), (_ONE, "mooncake-tcp", "get"),
     1.0),
    ("put_ratio_to_mooncake", (_ONE, "splitserve-stream", "put"), (_ONE, "mooncake-tcp", "put"),
     1.0),
    ("get_ratio_to_raw_4c3s", ("4c->3s", "splitserve-stream", "get"),
     ("4c->3s", "raw-grpc", "get"), 0.8),
    ("put_ratio_to_raw_4c3s", ("4c->3s", "splitserve-stream", "put"),
     ("4c->3s", "raw-grpc", "put"), 0.8),
)  # fmt: skip
LOOKUP_P99_GOAL_MS = 1.0


def summarize(results: list[Result]) -> dict:
    s: dict = {}
    lookup = find(results, "local", "redis-index", "lookup", block="-")
    for key, num, den, _ in RATIOS:
        if key == "get_ratio_to_mooncake":  # the five keys first, in its order
            s["lookup_p99_ms"] = lookup.p99_ms if lookup else None
        s[key] = ratio(find(results, *num), find(results, *den))
    # The same two ratios from the median call: a few slow calls (this machine is shared) move a
    # short run's GB/s; its median call barely moves.
    for key, num, den, _ in RATIOS[:2]:
        n, d = find(results, *num), find(results, *den)
        s[f"{key}_p50"] = round(d.p50_ms / n.p50_ms, 3) if n and d else None
    s["lookup_p50_ms"] = lookup.p50_ms if lookup else None
    s["lookups_s"] = lookup.calls_s if lookup else None
    for key, row in (
        ("get_gb_s", (_ONE, "splitserve-stream", "get")),
        ("put_gb_s", (_ONE, "splitserve-stream", "put")),
        ("shm_get_gb_s", (_ONE, "splitserve-shm", "get")),
        ("shm_put_gb_s", (_ONE, "splitserve-shm", "put")),
        ("raw_get_gb_s", (_ONE, "raw-grpc", "get")),
        ("raw_put_gb_s", (_ONE, "raw-grpc", "put")),
        ("mooncake_get_gb_s", (_ONE, "mooncake-tcp", "get")),
        ("mooncake_put_gb_s", (_ONE, "mooncake-tcp", "put")),
    ):
        r = find(results, *row)
        s[key] = r.gb_s if r else None
    return s


def print_goals(summary: dict) -> None:
    print(f"\n{'goal (2 MiB blocks)':<52} {'measured':>9} {'target':>9}")
    rows = [(k, f"{n[1]} {n[2]} / {d[1]} {d[2]} ({n[0]})", ">=", g) for k, n, d, g in RATIOS]
    rows.append(("lookup_p99_ms", f"index lookup p99 of {LOOKUP_IDS} ids, ms", "<=",
                 LOOKUP_P99_GOAL_MS))  # fmt: skip
    for key, label, op, goal in rows:
        v = summary[key]
        if v is None:
            print(f"{label:<52} {'-':>9} {op} {goal:<6} not measured")
            continue
        met = v >= goal if op == ">=" else v <= goal
        print(f"{label:<52} {v:>9.3f} {op} {goal:<6} {'met' if met else 'missed'}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="shorter run, under 60 s on 2 cores")
    ap.add_argument("--json", type=Path, help="write the report here")
    args = ap.parse_args(argv)

    cfg = QUICK if args.quick else FULL
    shapes = block_shapes()
    print(f"machine: {machine()}\nconfig: {asdict(cfg)}", flush=True)
    for s in shapes.values():
        print(f"block {s.name}: {s.dtype} {list(s.shape)} = {s.nbytes} B", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-kvstore-") as tmp:
        try:
            results, mooncake = asyncio.run(bench(cfg, shapes, Path(tmp)))
        except BenchError as e:
            print(f"error: {e}", file=sys.stderr)
            for log in sorted(Path(tmp).glob("*.log")):
                if tail := log.read_text(errors="replace").strip().splitlines()[-5:]:
                    print(f"--- {log.name}\n" + "\n".join(tail), file=sys.stderr)
            return 1
    summary = summarize(results)
    print_goals(summary)
    print("summary:", json.dumps(summary))
    if args.json:
        out = {
            "bench": "kvstore",
            "machine": machine(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": " ".join(["python", "bench/kvstore.py", *(argv or sys.argv[1:])]),
            "config": {**asdict(cfg), "blocks": {k: asdict(v) for k, v in shapes.items()}},
            "mooncake": mooncake,
            "results": [asdict(r) for r in results],
            "summary": summary,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
