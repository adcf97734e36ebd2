"""The KVStore gRPC servicer: Put, Get, Lookup, Pin, Unpin and Stats over one BlockStore, and
GetDevice over the holder's device pool when it has one (kvstore.device_pool).

Put and Get carry payloads through kvstore.wire rather than the generated message classes (see
add_kvstore_servicer); kvstore.server runs it (port, health, reflection, index, heartbeats).
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import os
from pathlib import Path

import grpc

from kvstore.block import (
    BATCH_BLOCKS,
    BATCH_BYTES,
    BLOCK_ID_BYTES,
    BlockError,
    BlockMeta,
    ChunkAssembler,
    OversizeBlockError,
    StoredBlock,
    chunk_slices,
)
from kvstore.block_store import DISK, MEMORY, BlockStore, PutResult
from kvstore.device_pool import DevicePool
from kvstore.index import RedisIndex
from kvstore.shm_layout import SharedMemoryLayout, host_id
from kvstore.wire import (
    Chunk,
    PutItem,
    Whole,
    decode_put_request,
    encode_get_batch,
    encode_get_chunk,
    encode_get_missing,
)
from kvstore.wire import serialize as wire_serialize
from protos.splitserve.v1 import kvstore_pb2 as pb
from protos.splitserve.v1 import kvstore_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["KVStore"].full_name
MAX_IDS_PER_CALL = 8192
_TIER_PB = {MEMORY: pb.TIER_MEMORY, DISK: pb.TIER_DISK}
_STATUS_PB = {
    "ok": pb.BlockStatus.OK,
    "present": pb.BlockStatus.ALREADY_PRESENT,
    "no_space": pb.BlockStatus.NO_SPACE,
}
# Put streams are stored in batches so the store's lock and the index's round trip are paid
# once per batch rather than once per block.
_STORE_BLOCKS, _STORE_BYTES = 256, 8 * 1024 * 1024


class KVStoreServicer(pb_grpc.KVStoreServicer):
    def __init__(
        self,
        store: BlockStore,
        index: RedisIndex | None,
        shm: SharedMemoryLayout | None,
        max_block_bytes: int,
        device_pool: DevicePool | None = None,
    ) -> None:
        self.store = store
        self.device_pool = device_pool
        self.index = index
        self.shm = shm
        self.max_block_bytes = max_block_bytes

    async def Put(self, request_iterator, context):
        asm = ChunkAssembler(self.max_block_bytes, verify=False)  # verified in _store
        results: list[PutResult] = []
        batch: list[StoredBlock] = []
        files: list[Path] = []
        reservations: set[str] = set()
        size = 0
        # One batch is stored (in a worker thread) while the next is received; batches land in
        # order because each store waits for the previous one first.
        storing: asyncio.Task | None = None

        async def flush() -> None:
            nonlocal storing, batch, files, size
            if storing is not None:
                results.extend(await storing)
            storing = asyncio.create_task(asyncio.to_thread(self._store, batch, files))
            batch, files, size = [], [], 0

        try:
            async for req in request_iterator:
                req: PutItem
                if req.error:
                    raise BlockError(req.error)
                if req.reservation_id:
                    reservations.add(req.reservation_id)
                for chunk in req.chunks:
                    if chunk.shm is not None:
                        if asm.in_progress:
                            raise BlockError("a shared-memory block inside another block's chunks")
                        block, path = self._adopt(chunk)
                        files.append(path)
                    else:
                        block = asm.feed(chunk)
                    if block is None:
                        continue
                    batch.append(block)
                    size += block.meta.size
                    if len(batch) >= _STORE_BLOCKS or size >= _STORE_BYTES:
                        await flush()
            if asm.in_progress:
                raise BlockError("the stream ended inside a block (no chunk with last=true)")
            if batch:
                await flush()
            if storing is not None:
                results.extend(await storing)
        except OversizeBlockError as e:
            await _drain(storing)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except BlockError as e:
            await _drain(storing)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if self.index is not None and reservations:
            await asyncio.to_thread(self.index.release_reservations, sorted(reservations))
        return pb.PutResponse(
            statuses=[
                pb.BlockStatus(
                    block_id=r.block_id,
                    code=_STATUS_PB[r.status],
                    message=r.message,
                    tier=_TIER_PB.get(r.tier or "", pb.TIER_UNSPECIFIED),
                )
                for r in results
            ]
        )

    def _store(self, blocks: list[StoredBlock], files: list[Path]) -> list[PutResult]:
        """In a worker thread: CRC checks (the C code releases the GIL) and the copies into the
        arena run beside the event loop, which keeps receiving the next batch."""
        try:
            for b in blocks:
                b.verify()
            return self.store.put_many(blocks)
        finally:
            for f in files:  # same-host writers' files, copied into the arena
                f.unlink(missing_ok=True)

    def _adopt(self, chunk: Chunk) -> tuple[StoredBlock, Path]:
        """A same-host writer's block: verify the file it left in incoming/ and read it."""
        if self.shm is None:
            raise BlockError("this holder has no shared-memory directory; send the bytes")
        if chunk.header is None or chunk.shm is None:
            raise BlockError("a shared-memory block needs its header")
        meta = BlockMeta.from_proto(chunk.header, self.max_block_bytes)
        name = Path(chunk.shm.path).name
        path = self.shm.incoming / name
        if Path(chunk.shm.path) != path or chunk.shm.offset != 0 or chunk.shm.length != meta.size:
            raise BlockError(f"block {meta.hex}: shared-memory file must be a whole file under "
                             f"{self.shm.incoming}")  # fmt: skip
        try:
            with path.open("rb") as fh:
                if os.fstat(fh.fileno()).st_size != meta.size:
                    raise BlockError(f"block {meta.hex}: shared-memory file has the wrong size")
                data = (
                    memoryview(mmap.mmap(fh.fileno(), meta.size, prot=mmap.PROT_READ))
                    if meta.size
                    else b""
                )
        except FileNotFoundError:
            raise BlockError(f"block {meta.hex}: shared-memory file {name} not found") from None
        return StoredBlock(meta, data), path  # verified in _store

    async def Get(self, request, context):
        ids = [bytes(b) for b in request.block_ids]
        await _check_ids(ids, context)
        use_shm = request.transport == pb.TRANSPORT_SHARED_MEMORY and self.shm is not None
        lease_s = (request.lease_ms or 5000) / 1000
        pin_id, _, missing = self.store.pin(ids, lease_s, request.pin_id if use_shm else "")
        try:
            if missing and not request.allow_missing:
                shown = ", ".join(b.hex() for b in missing[:4])
                more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
                await context.abort(
                    grpc.StatusCode.NOT_FOUND, f"blocks not held here: {shown}{more}"
                )
            batch: list[Whole] = []  # small blocks and shared-memory references
            size = 0
            for bid in ids:
                tier = self.store.tier_of(bid)
                block = (
                    self.store.get(bid)
                    if tier == MEMORY
                    else await asyncio.to_thread(self.store.get, bid)
                )
                if block is None and self.device_pool is not None:
                    block = await asyncio.to_thread(self.device_pool.read, bid)
                if block is None:
                    yield encode_get_missing(bid)
                    continue
                loc = self.store.shm_location(bid) if use_shm else None
                n = block.meta.size
                if loc is not None:
                    ref = pb.SharedMemoryRef(path=str(loc[0]), offset=loc[1], length=n)
                    batch.append((block.meta.header_bytes, b"", ref.SerializeToString()))
                elif n < BATCH_BYTES:
                    if size + n > BATCH_BYTES:
                        yield encode_get_batch(batch)
                        batch, size = [], 0
                    batch.append((block.meta.header_bytes, block.payload, None))
                    size += n
                else:
                    for header, data, last in chunk_slices(block.meta, block.payload):
                        yield encode_get_chunk(header, data, last)
                    continue
                if len(batch) >= BATCH_BLOCKS:
                    yield encode_get_batch(batch)
                    batch, size = [], 0
            if batch:
                yield encode_get_batch(batch)
        finally:
            if not use_shm:  # shared-memory readers keep the pin for the lease to map the files
                self.store.unpin(pin_id)

    async def Lookup(self, request, context):
        ids = [bytes(b) for b in request.block_ids]
        await _check_ids(ids, context)
        found = self.store.lookup(ids)
        return pb.LookupResponse(
            found=[pb.BlockLocation(block_id=b, tier=_TIER_PB[t], size=s) for b, t, s in found]
        )

    async def Pin(self, request, context):
        ids = [bytes(b) for b in request.block_ids]
        await _check_ids(ids, context)
        if request.lease_ms <= 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "lease_ms must be positive")
        pin_id, held, missing = self.store.pin(ids, request.lease_ms / 1000, request.pin_id)
        return pb.PinResponse(pin_id=pin_id, pinned=held, missing=missing)

    async def Unpin(self, request, context):
        n = self.store.unpin(request.pin_id)
        if self.device_pool is not None:
            n += self.device_pool.unpin(request.pin_id)
        return pb.UnpinResponse(released=n)

    async def GetDevice(self, request, context):
        ids = [bytes(b) for b in request.block_ids]
        await _check_ids(ids, context)
        if self.device_pool is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, "this holder has no device pool"
            )
        if not request.pin_id or request.lease_ms <= 0:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "GetDevice needs a pin_id and lease_ms > 0"
            )
        pool = self.device_pool
        if not pool.on_cuda:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, "this holder's device pool isn't on a GPU"
            )
        found, absent = await asyncio.to_thread(
            pool.locate, ids, request.pin_id, request.lease_ms / 1000
        )
        return pb.GetDeviceResponse(
            handle=await asyncio.to_thread(pool.share) if found else None,
            extents=[pb.DeviceExtent(header=m.to_proto(), offset=off) for m, off in found],
            absent=absent,
        )

    async def Stats(self, request, context):
        s = self.store.stats()
        return pb.StatsResponse(
            holder_id=self.store.holder_id,
            shm_dir=str(self.shm.root) if self.shm else "",
            host_id=host_id(),
            **{k: getattr(s, k) for k in _STATS_FIELDS},
        )


_STATS_FIELDS = (
    "memory_capacity",
    "memory_used",
    "disk_capacity",
    "disk_used",
    "memory_blocks",
    "disk_blocks",
    "lent_bytes",
    "lend_capacity",
    "pinned_blocks",
    "demotions",
    "evictions",
    "gets",
    "puts",
)


def add_kvstore_servicer(servicer: KVStoreServicer, server: grpc.aio.Server) -> None:
    """The generated registration, except that Put and Get carry payloads through kvstore.wire
    (no copies) instead of the generated message classes."""
    unary = {
        "Lookup": (pb.LookupRequest, pb.LookupResponse),
        "Pin": (pb.PinRequest, pb.PinResponse),
        "Unpin": (pb.UnpinRequest, pb.UnpinResponse),
        "Stats": (pb.StatsRequest, pb.StatsResponse),
        "GetDevice": (pb.GetDeviceRequest, pb.GetDeviceResponse),
    }
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, name),
            request_deserializer=req.FromString,
            response_serializer=resp.SerializeToString,
        )
        for name, (req, resp) in unary.items()
    }
    handlers["Put"] = grpc.stream_unary_rpc_method_handler(
        servicer.Put,
        request_deserializer=decode_put_request,
        response_serializer=pb.PutResponse.SerializeToString,
    )
    handlers["Get"] = grpc.unary_stream_rpc_method_handler(
        servicer.Get,
        request_deserializer=pb.GetRequest.FromString,
        response_serializer=wire_serialize,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


async def _drain(task: asyncio.Task | None) -> None:
    # Blocks that arrived intact before a bad one are kept; let their store finish.
    if task is not None:
        await task


async def _check_ids(ids: list[bytes], context) -> None:
    if len(ids) > MAX_IDS_PER_CALL:
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{len(ids)} block ids in one call; the limit is {MAX_IDS_PER_CALL}",
        )
    for b in ids:
        if len(b) != BLOCK_ID_BYTES:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"block id {b.hex()!r} has {len(b)} bytes; ids are {BLOCK_ID_BYTES}-byte hashes",
            )
