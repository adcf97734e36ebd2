"""The KV store's side of bench/kvstore.py: its put and get as timed ops (over the stream or
shared memory, through KVStoreClient), index lookups, and the memcpy yardstick."""

from __future__ import annotations

import time
import uuid

import numpy as np

from bench.kvstore_common import (
    BLOCK_TOKENS,
    LOOKUP_IDS,
    MODEL_ID,
    BenchError,
    BlockShape,
    Config,
    Op,
    Timing,
    payloads,
    timed_sync,
)
from kvstore.block import StoredBlock, TensorSpec
from kvstore.client import KVStoreClient
from kvstore.index import IndexReader


async def check_path(client: KVStoreClient, shm: bool) -> None:
    """The path under test is the one in use: with shared_memory=True a holder the client cannot
    map would silently be served over the stream."""
    if shm and not all(
        client.transports[0].reaches(h) for h in (await client.index.live_holders()).values()
    ):
        raise BenchError("shared memory does not reach every holder (is /dev/shm too small?)")


class KVPut(Op):
    """Builds (checksums) and puts a batch of fresh blocks per call. `ids` keeps the newest ids:
    the last to be evicted, so a get that follows finds them."""

    def __init__(self, redis_url: str, ns: str, shm: bool, shape: BlockShape, cfg: Config,
                 seed: int, holder: str | None = None) -> None:  # fmt: skip
        self.args = (redis_url, ns, holder, shm)
        self.data = payloads(shape.nbytes, cfg.batch, seed)
        self.tensors = [TensorSpec(shape.dtype, shape.shape)]
        self.nbytes, self.blocks, self.cap = shape.nbytes * cfg.batch, cfg.batch, cfg.put_cap_bytes
        self.keep = max(LOOKUP_IDS, cfg.batch)
        self.ids: list[bytes] = []

    async def __aenter__(self) -> KVPut:
        url, ns, holder, shm = self.args
        self.client = KVStoreClient(url, ns, local_holder=holder, shared_memory=shm)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.client.close()

    async def call(self, i: int) -> None:
        tokens = tuple(range(BLOCK_TOKENS))
        blocks = [
            StoredBlock.build(uuid.uuid4().bytes, MODEL_ID, p, self.tensors, tokens)
            for p in self.data
        ]
        if i < 0:
            await check_path(self.client, self.args[3])
        report = await self.client.put(blocks)
        if report.failed or len(report.stored) != len(blocks):
            why = next(iter(report.failed.values()), "not stored")
            raise BenchError(f"put: {len(report.failed)} of {len(blocks)} blocks failed: {why}")
        self.ids = [*self.ids, *(b.block_id for b in blocks)][-self.keep :]


class KVGet(Op):
    """Gets `ids` in batches into one caller buffer; the client verifies every block's CRC32C
    before delivering it."""

    def __init__(self, redis_url: str, ns: str, shm: bool, shape: BlockShape, ids: list[bytes],
                 cfg: Config) -> None:  # fmt: skip
        self.args = (redis_url, ns, shm)
        self.batches = [ids[i : i + cfg.batch] for i in range(0, len(ids), cfg.batch)]
        if not self.batches or len(self.batches[-1]) != cfg.batch:
            raise BenchError(f"get: {len(ids)} ids do not make whole batches of {cfg.batch}")
        self.nbytes, self.blocks = shape.nbytes * cfg.batch, cfg.batch

    async def __aenter__(self) -> KVGet:
        url, ns, shm = self.args
        self.client = KVStoreClient(url, ns, shared_memory=shm)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.client.close()

    async def call(self, i: int) -> None:
        want = self.batches[i % len(self.batches)]
        # Delivered straight into the caller's memory (as decode fills its KV cache): each
        # verified block is copied once from the holder's shared memory or the received message.
        if not hasattr(self, "dst"):
            self.dst = np.empty(self.nbytes, np.uint8)
        slot = {bid: k * (self.nbytes // self.blocks) for k, bid in enumerate(want)}

        def into(meta, view) -> None:
            off = slot[meta.block_id]
            self.dst[off : off + meta.size] = np.frombuffer(view, np.uint8)

        res = await self.client.get(want, into=into)
        if res.missing or len(res.sources) != len(want):
            raise BenchError(f"get: {len(res.missing)} of {len(want)} blocks missing")
        if i < 0:
            await check_path(self.client, self.args[2])


async def lookups(redis_url: str, ns: str, ids: list[bytes], cfg: Config) -> Timing:
    hex_ids = [i.hex() for i in ids[-LOOKUP_IDS:]]
    if len(hex_ids) != LOOKUP_IDS:
        raise BenchError(f"lookup: only {len(hex_ids)} ids were put")
    reader = IndexReader(redis_url, ns)
    try:
        for _ in range(20):  # warm-up: the connection pool, the live-holder cache
            if not all(await reader.locate(hex_ids)):
                raise BenchError("lookup: an id that was put is not in the index")
        lat: list[float] = []
        t0 = e = time.monotonic()
        for _ in range(cfg.lookups):
            s = time.monotonic()
            await reader.locate(hex_ids)
            e = time.monotonic()
            lat.append(e - s)
    finally:
        await reader.close()
    return Timing(t0, e, len(lat), 0, 0, lat)


def memcpy(shape: BlockShape, cfg: Config, fresh: bool = False) -> Timing:
    """A batch's bytes copied into one buffer that is reused, or (fresh) into a new buffer per
    block, kept until the batch is done: what any get that returns new objects pays at least."""
    data = payloads(shape.nbytes, cfg.batch, seed=3)
    dst = np.empty(shape.nbytes * cfg.batch, np.uint8)
    src = np.frombuffer(data[0].obj, np.uint8)

    def call(i: int) -> None:
        if fresh:
            kept = [bytes(p) for p in data]
            del kept
        else:
            np.copyto(dst, src)

    return timed_sync(call, cfg, shape.nbytes * cfg.batch, cfg.batch)
