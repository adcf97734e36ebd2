"""The KV store client: put blocks where there is room, get them from whoever holds them.

`get` never returns wrong bytes: every block is checked against its CRC32C; a holder that fails,
times out or sends a bad block is skipped for the next one that holds the id; ids that no live
holder could deliver come back in `missing`, for the caller to recompute.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc
import redis

from kvstore.block import BlockError, BlockMeta, StoredBlock
from kvstore.cuda_ipc import DeviceBlock
from kvstore.deadlines import CallBudget
from kvstore.index import HolderInfo, IndexReader
from kvstore.transport import (
    InPlace,
    KVStoreMethods,
    SharedMemoryTransport,
    StreamTransport,
    Transport,
    channel_for,
)
from protos.splitserve.v1 import kvstore_pb2 as pb

log = logging.getLogger(__name__)

_TIER_RANK = {"memory": 0, "disk": 1}
Deliver = Callable[[BlockMeta, memoryview], None]


@dataclass
class PutReport:
    stored: dict[bytes, str] = field(default_factory=dict)  # block id -> holder id
    failed: dict[bytes, str] = field(default_factory=dict)  # block id -> why

    @property
    def ok(self) -> bool:
        return not self.failed


@dataclass
class GetResult:
    blocks: dict[bytes, StoredBlock] = field(default_factory=dict)  # empty when `into` is used
    missing: list[bytes] = field(default_factory=list)
    sources: dict[bytes, str] = field(default_factory=dict)  # block id -> holder id (delivered)


class KVStoreClient:
    """asyncio client. `local_holder` is the holder id of this process's own shard, if any: puts
    go there first and overflow to peers with spare memory (lending)."""

    def __init__(
        self,
        redis_url: str,
        namespace: str = "splitserve",
        local_holder: str | None = None,
        shared_memory: bool = True,
        budget: CallBudget | None = None,
        reservation_ttl_ms: int = 30_000,
        device=None,
    ) -> None:
        """budget: how long to wait on a holder (kvstore.deadlines: calls that move blocks end
        when the holder stops making progress, not at a fixed time). device: a CUDA device to
        receive blocks on; same-host holders' device pools are then read GPU to GPU
        (kvstore.cuda_ipc), and such blocks arrive as tensors on it."""
        self.index = IndexReader(redis_url, namespace)
        self.local_holder = local_holder
        self.transports: list[Transport] = [StreamTransport()]
        if shared_memory:
            self.transports.insert(0, SharedMemoryTransport())
        if device is not None:
            from kvstore.cuda_ipc import CudaIpcTransport

            self.transports.insert(0, CudaIpcTransport(device, self.transports[0]))
        self.budget = budget or CallBudget()
        self.reservation_ttl_ms = reservation_ttl_ms
        self._channels: dict[str, tuple[grpc.aio.Channel, KVStoreMethods]] = {}

    async def close(self) -> None:
        for ch, stub in self._channels.values():
            await stub.settle()
            await ch.close()
        self._channels.clear()
        await self.index.close()

    async def __aenter__(self) -> KVStoreClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def _stub(self, holder: HolderInfo) -> KVStoreMethods:
        entry = self._channels.get(holder.address)
        if entry is None:
            ch = channel_for(holder.address)
            entry = self._channels[holder.address] = (ch, KVStoreMethods(ch))
        return entry[1]

    def _transport(self, holder: HolderInfo) -> Transport:
        return next(t for t in self.transports if t.reaches(holder))

    def is_local(self, holder: HolderInfo) -> bool:
        return holder.holder_id == self.local_holder

    # -- put --------------------------------------------------------------------------------

    async def put(self, blocks: Sequence[StoredBlock], skip_present: bool = True) -> PutReport:
        """Store blocks; those a live holder already has are not sent again (skip_present)."""
        report = PutReport()
        if not blocks:
            return report
        live = await self.index.live_holders()
        if not live:
            live = await self.index.live_holders(refresh=True)
        if not live:
            report.failed = {b.block_id: "no live KV holder is registered" for b in blocks}
            return report
        pending = list({b.block_id: b for b in blocks}.values())
        if skip_present:
            locs = await self.index.locate([b.meta.hex for b in pending])
            for b, loc in zip(list(pending), locs, strict=True):
                if loc:
                    report.stored[b.block_id] = min(loc)
            pending = [b for b in pending if b.block_id not in report.stored]
        local = live.get(self.local_holder or "") or self._nearest(live)
        # This process's shard first, up to its free memory; the rest is lent space elsewhere.
        room = local.mem_free
        mine, rest = [], []
        for b in pending:
            (mine if b.meta.size <= room else rest).append(b)
            if b.meta.size <= room:
                room -= b.meta.size
        pending = rest + (await self._send(local, mine, "", report) if mine else [])
        owner = local.holder_id
        for peer in sorted(live.values(), key=lambda h: -h.mem_free):
            if not pending:
                break
            if peer.holder_id == local.holder_id:
                continue
            batch = _fit(pending, min(peer.mem_free, peer.lend_capacity - peer.lent))
            if not batch:
                continue
            resv = uuid.uuid4().hex
            need = sum(b.meta.size for b in batch)
            if not await self.index.reserve(peer.holder_id, need, resv, self.reservation_ttl_ms):
                continue
            lent = [_with_owner(b, owner) for b in batch]
            leftover = await self._send(peer, lent, resv, report)
            sent = {b.block_id for b in batch}
            left_ids = {b.block_id for b in leftover}
            pending = [b for b in pending if b.block_id not in sent or b.block_id in left_ids]
        if pending:
            # No peer has spare memory: the local shard takes them and demotes older blocks.
            pending = await self._send(local, pending, "", report)
        for b in pending:
            report.failed.setdefault(b.block_id, "no holder had room")
        return report

    def _nearest(self, live: dict[str, HolderInfo]) -> HolderInfo:
        same_host = [h for h in live.values() if self.transports[0].reaches(h)]
        pool = same_host or list(live.values())
        return max(pool, key=lambda h: (h.mem_free, h.holder_id))

    async def _send(
        self, holder: HolderInfo, blocks: list[StoredBlock], resv: str, report: PutReport
    ) -> list[StoredBlock]:
        """Put blocks on one holder; returns those it had no room for."""
        try:
            statuses = await self._transport(holder).put(
                self._stub(holder), holder, blocks, resv, self.budget
            )
        except grpc.aio.AioRpcError as e:
            for b in blocks:
                report.failed[b.block_id] = f"{holder.holder_id}: {e.code().name}: {e.details()}"
            return []
        by_id = {bytes(s.block_id): s for s in statuses}
        left = []
        for b in blocks:
            s = by_id.get(b.block_id)
            if s is None or s.code == pb.BlockStatus.NO_SPACE:
                left.append(b)
            else:
                report.stored[b.block_id] = holder.holder_id
                report.failed.pop(b.block_id, None)
        return left

    # -- get --------------------------------------------------------------------------------

    async def get(
        self, ids: Sequence[bytes], into: Deliver | None = None, source: str | None = None
    ) -> GetResult:
        """Fetch blocks by id. With `into`, each verified block is handed to
        into(meta, payload view) instead of being kept: the view is valid only during the call
        (it may be the holder's shared memory or the received message), so the callback copies
        it where it belongs, e.g. straight into a KV cache. No intermediate buffer is made.
        `source`: a holder id to ask first (a prefill's shard: its device pool isn't indexed);
        what it doesn't deliver is located through the index. While the index (Redis) is
        unreachable, what is left comes back missing: the caller recomputes it."""
        result = GetResult()
        ids = list(dict.fromkeys(bytes(i) for i in ids))
        if not ids:
            return result
        try:
            live = await self.index.live_holders()
            if source is not None and source not in live:
                live = await self.index.live_holders(refresh=True)
            if source is not None and source in live:
                ids = await self._fetch(live[source], ids, result, into)
                if not ids:
                    return result
            locs = await self.index.locate([i.hex() for i in ids])
        except redis.RedisError as e:
            log.warning("KV index unreachable, %d blocks left to recompute: %s", len(ids), e)
            result.missing = ids
            return result
        candidates = {bid: self._rank(bid, loc, live) for bid, loc in zip(ids, locs, strict=True)}
        pending = [bid for bid in ids if candidates[bid]]
        result.missing = [bid for bid in ids if not candidates[bid]]
        while pending:
            groups: dict[str, list[bytes]] = defaultdict(list)
            for bid in pending:
                groups[candidates[bid].pop(0)].append(bid)
            got = await asyncio.gather(
                *(self._fetch(live[hid], gids, result, into) for hid, gids in groups.items())
            )
            failed = [bid for f in got for bid in f]
            pending = [bid for bid in failed if candidates[bid]]
            result.missing += [bid for bid in failed if not candidates[bid]]
        missing = set(result.missing)
        result.missing = [bid for bid in ids if bid in missing]
        return result

    def _rank(self, bid: bytes, loc: dict[str, tuple[str, int]], live) -> list[str]:
        if len(loc) < 2:  # most ids have one holder: nothing to rank
            return [hid for hid in loc if hid in live]

        def key(hid: str):
            h = live[hid]
            near = 0 if self.transports[0].reaches(h) else 1
            return (near, _TIER_RANK.get(loc[hid][0], 2), random.random())

        return sorted((hid for hid in loc if hid in live), key=key)

    async def _fetch(
        self, holder: HolderInfo, ids: list[bytes], result: GetResult, into: Deliver | None
    ) -> list[bytes]:
        """Fetch from one holder; returns the ids it did not deliver intact."""
        want = set(ids)
        try:
            async for item in self._transport(holder).get(
                self._stub(holder), holder, ids, self.budget, copy=into is None
            ):
                if isinstance(item, bytes):
                    continue
                if item.block_id not in want:
                    continue
                try:
                    if not isinstance(item, InPlace | DeviceBlock):
                        item.verify()
                except BlockError as e:
                    log.warning("%s sent a bad block: %s", holder.holder_id, e)
                    continue
                if into is None:
                    result.blocks[item.block_id] = item
                elif isinstance(item, DeviceBlock):
                    into(item.meta, memoryview(item.payload.cpu().numpy()))
                else:
                    into(item.meta, memoryview(item.payload))
                result.sources[item.block_id] = holder.holder_id
                want.discard(item.block_id)
        except (grpc.aio.AioRpcError, BlockError, OSError) as e:
            log.info("get from %s stopped: %s", holder.holder_id, e)
        return [bid for bid in ids if bid in want]

    async def unpin(self, address: str, pin_id: str) -> int:
        """Release a pin on the holder at `address` (a prefill shard's, once its blocks are
        pulled)."""
        ch_entry = self._channels.get(address)
        if ch_entry is None:
            ch = channel_for(address)
            ch_entry = self._channels[address] = (ch, KVStoreMethods(ch))
        resp = await ch_entry[1].Unpin(pb.UnpinRequest(pin_id=pin_id), timeout=self.budget.base_s)
        return resp.released

    async def stats(self, holder: HolderInfo) -> pb.StatsResponse:
        return await self._stub(holder).Stats(pb.StatsRequest(), timeout=self.budget.base_s)


def _fit(blocks: list[StoredBlock], room: int) -> list[StoredBlock]:
    out = []
    for b in blocks:
        if b.meta.size <= room:
            out.append(b)
            room -= b.meta.size
    return out


def _with_owner(b: StoredBlock, owner: str) -> StoredBlock:
    from dataclasses import replace

    return StoredBlock(replace(b.meta, owner=owner), b.payload)


class SyncKVStoreClient:
    """Blocking wrapper for tools and scripts: the async client on a private event loop."""

    def __init__(self, *args, **kwargs) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._client: KVStoreClient = self._run(_make(*args, **kwargs))

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def put(self, blocks: Sequence[StoredBlock]) -> PutReport:
        return self._run(self._client.put(blocks))

    def get(self, ids: Sequence[bytes]) -> GetResult:
        return self._run(self._client.get(ids))

    def close(self) -> None:
        self._run(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    def __enter__(self) -> SyncKVStoreClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


async def _make(*args, **kwargs) -> KVStoreClient:
    return KVStoreClient(*args, **kwargs)
