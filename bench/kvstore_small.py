"""Many small blocks from many clients in one process: the KV store's cost per block.

32 clients each put 1,000 blocks of 512 bytes and then get them back, from 3 holders served on
one event-loop thread of the same process, a real valkey holding the index: the load of
tests/test_kvstore_cluster.py's 32-client test. Everything shares one Python process (one GIL),
so each per-block cost (wire codecs, headers, the store, index writes, gRPC messages) adds up in
the figures, which the 2 MiB-block benchmark (bench/kvstore.py) hides behind its bytes.

    python bench/kvstore_small.py [--runs 3] [--clients 32] [--blocks 1000] [--size 512]
                                  [--json PATH]

Per run: wall and process CPU seconds of the put phase (all clients at once) and of the get
phase, and how many blocks failed to go in (put_failed: past a deadline, say) or to come back
(get_missing); the summary gives the median of the runs and blocks a second over both phases.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import write_report
from kvstore.client import KVStoreClient
from kvstore.redis_server import EmbeddedRedis
from tests.kv_helpers import LoopThread, make_blocks

HOLDERS = 3
MEMORY_BYTES = 24 << 20


async def one_run(url: str, ns: str, per_client: list) -> dict[str, float]:
    clients = [
        KVStoreClient(url, namespace=ns, local_holder=f"h{i % HOLDERS}", shared_memory=False)
        for i in range(len(per_client))
    ]
    try:
        await asyncio.gather(*(c.index.live_holders() for c in clients))
        c0, t0 = time.process_time(), time.perf_counter()
        reps = await asyncio.gather(*(c.put(b) for c, b in zip(clients, per_client, strict=True)))
        c1, t1 = time.process_time(), time.perf_counter()
        ress = await asyncio.gather(
            *(c.get([b.block_id for b in bs]) for c, bs in zip(clients, per_client, strict=True))
        )
        c2, t2 = time.process_time(), time.perf_counter()
    finally:
        for c in clients:
            await c.close()
    return {
        "put_s": t1 - t0,
        "get_s": t2 - t1,
        "put_cpu_s": c1 - c0,
        "get_cpu_s": c2 - c1,
        "put_failed": sum(len(r.failed) for r in reps),  # e.g. past a deadline
        "get_missing": sum(len(r.missing) for r in ress),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--blocks", type=int, default=1000, help="blocks per client")
    ap.add_argument("--size", type=int, default=512, help="payload bytes per block")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--quick", action="store_true", help="one run")
    args = ap.parse_args(argv)
    if args.quick:
        args.runs = 1

    results = []
    with EmbeddedRedis() as redis:
        for run in range(args.runs):
            ns = f"bench{uuid.uuid4().hex[:8]}"  # fresh holders and index each run
            lt = LoopThread()
            try:
                for i in range(HOLDERS):
                    lt.server(redis_url=redis.url, namespace=ns, holder_id=f"h{i}",
                              memory_bytes=MEMORY_BYTES, shm=False)  # fmt: skip
                per_client = [
                    make_blocks(args.blocks, args.size, seed=100 * run + i)
                    for i in range(args.clients)
                ]
                r = asyncio.run(one_run(redis.url, ns, per_client))
            finally:
                lt.close()
            results.append(r)
            print(" ".join(f"{k} {v:.2f}" for k, v in r.items()), flush=True)
    n = args.clients * args.blocks
    summary = {k: round(statistics.median(r[k] for r in results), 3) for k in results[0]}
    summary["blocks_per_s"] = round(2 * n / (summary["put_s"] + summary["get_s"]))
    print("median:", summary)
    write_report(args.json, "kvstore_small", argv, results, summary,
                 workload={"clients": args.clients, "blocks": args.blocks, "size": args.size,
                           "holders": HOLDERS})  # fmt: skip
    return summary


if __name__ == "__main__":
    main()
