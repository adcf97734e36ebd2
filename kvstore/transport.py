"""The data plane under Put and Get: how block bytes travel between a client and a holder.

Control always goes over the holder's gRPC KVStore service; a transport decides where the
payload goes:

- StreamTransport: bytes inside the gRPC stream. Works everywhere.
- SharedMemoryTransport: same host only. A writer leaves each payload as a file in the holder's
  tmpfs directory and hands it over by name; a reader maps the holder's files. No bytes cross the
  socket.
- CudaIpcTransport (kvstore.cuda_ipc): same host, GPU to GPU, from a holder's device pool.

An RDMA or GPU-direct library (Mooncake Transfer Engine, NIXL) fits the same shape: `reaches`
says whether it can talk to that holder, `put`/`get` move blocks, and the client tries
transports in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import Protocol

import grpc

from kvstore.block import (
    BATCH_BLOCKS,
    BlockError,
    BlockMeta,
    ChunkAssembler,
    StoredBlock,
    chunk_slices,
    message_groups,
)
from kvstore.deadlines import CallBudget, Watchdog
from kvstore.index import HolderInfo
from kvstore.wire import GetItem as GetMessage
from kvstore.wire import (
    Whole,
    decode_get_response,
    encode_put_batch,
    encode_put_request,
    serialize,
)
from protos.splitserve.v1 import kvstore_pb2 as pb
from rpc.channel import insecure_channel

GetItem = StoredBlock | bytes  # a block, or the id of one the holder does not have


class Transport(Protocol):
    name: str

    def reaches(self, holder: HolderInfo) -> bool: ...

    async def put(
        self,
        stub: KVStoreMethods,
        holder: HolderInfo,
        blocks: Sequence[StoredBlock],
        reservation_id: str,
        budget: CallBudget,
    ) -> list[pb.BlockStatus]: ...

    def get(
        self,
        stub: KVStoreMethods,
        holder: HolderInfo,
        ids: Sequence[bytes],
        budget: CallBudget,
        copy: bool = True,
    ) -> AsyncIterator[GetItem]:
        """Blocks as they arrive. copy=False may yield views that are valid only until the
        next item (the caller copies them out at once)."""
        ...


class StreamTransport:
    name = "stream"
    # Bytes that crossed a socket are checked against their CRC32C by the client.
    trusted = False

    def reaches(self, holder: HolderInfo) -> bool:
        return True

    async def put(self, stub, holder, blocks, reservation_id, budget):
        def requests():
            resv = reservation_id  # rides on the first message
            for group in message_groups(blocks):
                if len(group) > 1:
                    whole = [(b.meta.header_bytes, b.payload, None) for b in group]
                    yield encode_put_batch(whole, resv)
                    resv = ""
                    continue
                b = group[0]
                for header, data, last in chunk_slices(b.meta, b.payload):
                    yield encode_put_request(header, data, last, reservation_id=resv)
                    resv = ""

        nbytes = sum(b.meta.size for b in blocks)
        return await put_call(stub, holder, requests(), nbytes, len(blocks), budget)

    async def get(self, stub, holder, ids, budget, copy=True):
        asm = ChunkAssembler()
        req = pb.GetRequest(block_ids=ids, transport=pb.TRANSPORT_STREAM, allow_missing=True)
        async with contextlib.aclosing(get_call(stub, holder, req, budget)) as responses:
            async for resp in responses:
                if resp.missing_block_id:
                    yield resp.missing_block_id
                    continue
                for c in resp.chunks:
                    block = asm.feed(c)
                    if block is not None:
                        yield block


class SharedMemoryTransport:
    name = "shm"
    # Extents read in place are not re-checked: the holder checked the CRC when the block
    # arrived, the bytes never leave this host's memory, and the Get's pin keeps the extent from
    # being reused until the reader is done (an arena file is never truncated in place either).
    # Blocks that arrive as data (disk tier) are not marked and are checked as usual.
    trusted = True

    def __init__(self, lease_ms: int = 10_000) -> None:
        self.lease_ms = lease_ms
        self._seen: dict[str, bool] = {}
        self._maps: dict[str, tuple[int, memoryview]] = {}  # arena path -> (inode, mapping)

    def reaches(self, holder: HolderInfo) -> bool:
        """True when this process sees the holder's tmpfs directory (same host and mounts)."""
        if not holder.shm_dir:
            return False
        key = f"{holder.holder_id}:{holder.shm_dir}"
        if key not in self._seen:
            try:
                marker = (Path(holder.shm_dir) / "holder").read_text()
            except OSError:
                marker = ""
            self._seen[key] = marker == holder.holder_id
        return self._seen[key]

    async def put(self, stub, holder, blocks, reservation_id, budget):
        incoming = Path(holder.shm_dir) / "incoming"
        written: list[Path] = []
        try:
            refs: list[Whole] = []
            for b in blocks:
                path = incoming / f"{uuid.uuid4().hex}.part"
                with path.open("wb") as fh:
                    fh.write(b.payload)
                written.append(path)
                ref = pb.SharedMemoryRef(path=str(path), offset=0, length=b.meta.size)
                refs.append((b.meta.header_bytes, b"", ref.SerializeToString()))
            reqs = [
                encode_put_batch(refs[i : i + BATCH_BLOCKS], "" if i else reservation_id)
                for i in range(0, len(refs), BATCH_BLOCKS)
            ]
            # The holder copies the files into its arena: the same work as bytes on the wire.
            nbytes = sum(b.meta.size for b in blocks)
            return await put_call(stub, holder, reqs, nbytes, len(blocks), budget)
        finally:
            for p in written:  # adopted files were renamed away; these are the leftovers
                p.unlink(missing_ok=True)

    async def get(self, stub, holder, ids, budget, copy=True):
        asm = ChunkAssembler()
        pin_id = uuid.uuid4().hex
        req = pb.GetRequest(
            block_ids=ids,
            transport=pb.TRANSPORT_SHARED_MEMORY,
            allow_missing=True,
            lease_ms=self.lease_ms,
            pin_id=pin_id,
        )
        try:
            async with contextlib.aclosing(get_call(stub, holder, req, budget)) as responses:
                async for item in self._read(responses, asm, copy):
                    yield item
        finally:
            unpin_later(stub, pin_id, budget.base_s)

    async def _read(self, responses, asm: ChunkAssembler, copy: bool) -> AsyncIterator[GetItem]:
        arenas: dict[str, memoryview | None] = {}  # one stat per arena per call, not per block
        async for resp in responses:
            if resp.missing_block_id:
                yield resp.missing_block_id
                continue
            for c in resp.chunks:
                if c.shm is None:  # a disk-tier block arrives as bytes
                    block = asm.feed(c)
                    if block is not None:
                        yield block
                    continue
                if c.header is None:
                    raise BlockError("a shared-memory answer without its header")
                meta = BlockMeta.from_proto(c.header)
                if c.shm.path not in arenas:
                    try:
                        arenas[c.shm.path] = self._arena(c.shm.path)
                    except OSError:
                        arenas[c.shm.path] = None  # the holder went away
                arena = arenas[c.shm.path]
                if arena is None:
                    yield meta.block_id  # treated as missing: another holder, or recompute
                    continue
                end = c.shm.offset + c.shm.length
                if end > arena.nbytes:
                    raise BlockError(f"block {meta.hex}: shared-memory extent past the arena end")
                # The holder's pin holds the extent only until this get ends: a block that
                # outlives the call is copied out, so it never changes under its reader.
                view = arena[c.shm.offset : end]
                yield InPlace(meta, view.tobytes() if copy else view)

    def _arena(self, path: str) -> memoryview:
        """The holder's arena, mapped once (again if the holder restarted with a new file)."""
        ino = os.stat(path).st_ino
        cached = self._maps.get(path)
        if cached is not None and cached[0] == ino:
            return cached[1]
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            view = memoryview(mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ))
        finally:
            os.close(fd)
        self._maps[path] = (ino, view)
        return view


async def put_call(
    stub: KVStoreMethods,
    holder: HolderInfo,
    messages: Iterable[bytes],
    nbytes: int,
    nblocks: int,
    budget: CallBudget,
) -> list[pb.BlockStatus]:
    """One Put: watched while the holder takes its messages, with a deadline for the work it
    carries (kvstore.deadlines)."""
    dog = Watchdog(budget.stall_s, holder.holder_id)
    call = stub.Put(dog.requests(messages), timeout=budget.deadline_s(nbytes, nblocks))
    with dog.watching(call):
        resp = await call
    return list(resp.statuses)


async def get_call(
    stub: KVStoreMethods, holder: HolderInfo, request: pb.GetRequest, budget: CallBudget
) -> AsyncIterator[GetMessage]:
    """One Get's responses. No deadline: however long the blocks take, the call ends only when
    the holder is silent for budget.stall_s (kvstore.deadlines). A reader that stops early
    (aclosing) cancels the call, so the holder stops sending."""
    dog = Watchdog(budget.stall_s, holder.holder_id)
    call = stub.Get(request)
    with dog.watching(call):
        try:
            async with contextlib.aclosing(dog.responses()) as responses:
                async for resp in responses:
                    yield resp
        finally:
            call.cancel()  # a no-op once the call has ended


class InPlace(StoredBlock):
    """A block read from a holder's shared memory: see SharedMemoryTransport.trusted."""


def unpin_later(stub: KVStoreMethods, pin_id: str, timeout: float) -> None:
    """Release a reader's pin in the background once it has copied what it read, so the holder
    can evict again without waiting for the lease (which covers a lost Unpin). The client waits
    for these when it closes (KVStoreMethods.settle)."""
    task = asyncio.ensure_future(_unpin(stub, pin_id, timeout))
    stub.unpins.add(task)
    task.add_done_callback(stub.unpins.discard)


async def _unpin(stub, pin_id: str, timeout: float) -> None:
    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.TimeoutError):
        await stub.Unpin(pb.UnpinRequest(pin_id=pin_id), timeout=timeout)


class KVStoreMethods:
    """Client-side callables for one channel: the generated stub's, except Put and Get, which
    carry payloads through kvstore.wire without copies."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.unpins: set[asyncio.Future] = set()  # unpin_later's calls, until answered
        base = "/splitserve.v1.KVStore/"
        self.Put = channel.stream_unary(
            base + "Put",
            request_serializer=serialize,
            response_deserializer=pb.PutResponse.FromString,
        )
        self.Get = channel.unary_stream(
            base + "Get",
            request_serializer=pb.GetRequest.SerializeToString,
            response_deserializer=decode_get_response,
        )
        for name, resp in (
            ("Lookup", pb.LookupResponse),
            ("Pin", pb.PinResponse),
            ("Unpin", pb.UnpinResponse),
            ("Stats", pb.StatsResponse),
            ("GetDevice", pb.GetDeviceResponse),
        ):
            setattr(
                self,
                name,
                channel.unary_unary(
                    base + name,
                    request_serializer=serialize,
                    response_deserializer=resp.FromString,
                ),
            )

    async def settle(self) -> None:
        """Wait for the background Unpins (each bounded by its timeout), so a client that closes
        its channel releases what it read instead of leaving it pinned until the lease ends."""
        if self.unpins:
            await asyncio.gather(*self.unpins, return_exceptions=True)


def channel_for(address: str) -> grpc.aio.Channel:
    return insecure_channel(address)
