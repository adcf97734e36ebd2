"""The block server: a gRPC KVStore service over one BlockStore, registered in the Redis index.

splitserve serve kvstore --port 0 --redis URL --memory 4GiB --disk DIR:20GiB
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import shutil
import socket
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kvstore.block import (
    BLOCK_ID_BYTES,
    BlockError,
    BlockMeta,
    ChunkAssembler,
    OversizeBlockError,
    StoredBlock,
    chunk_slices,
)
from kvstore.block_store import DISK, MEMORY, BlockStore, PutResult
from kvstore.index import RedisIndex
from kvstore.wire import (
    Chunk,
    PutItem,
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
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]
_TIER_PB = {MEMORY: pb.TIER_MEMORY, DISK: pb.TIER_DISK}
_STATUS_PB = {
    "ok": pb.BlockStatus.OK,
    "present": pb.BlockStatus.ALREADY_PRESENT,
    "no_space": pb.BlockStatus.NO_SPACE,
}
# Put streams are stored in batches so the store's lock and the index's round trip are paid
# once per batch rather than once per block.
_BATCH_BLOCKS, _BATCH_BYTES = 256, 8 * 1024 * 1024


def host_id() -> str:
    return socket.gethostname()


@dataclass
class SharedMemoryLayout:
    """A holder's tmpfs directory: blocks/arena (the memory tier's arena, which same-host readers
    map), incoming/ (same-host writers put files here and hand them over by name), and a marker
    naming the holder, by which a client proves it sees the same files (same host and mounts)."""

    root: Path

    @property
    def blocks(self) -> Path:
        return self.root / "blocks"

    @property
    def incoming(self) -> Path:
        return self.root / "incoming"

    @property
    def marker(self) -> Path:
        return self.root / "holder"

    def create(self, holder_id: str) -> None:
        self.incoming.mkdir(parents=True, exist_ok=True)
        for f in self.incoming.iterdir():
            f.unlink(missing_ok=True)
        self.marker.write_text(holder_id)


def default_shm_root(holder_id: str, memory_bytes: int) -> Path | None:
    """/dev/shm when it exists and can hold the memory budget (containers often give 64 MiB)."""
    base = Path("/dev/shm")
    try:
        st = os.statvfs(base)
    except OSError:
        return None
    if not os.access(base, os.W_OK) or st.f_bavail * st.f_frsize < memory_bytes:
        return None
    return base / f"splitserve-{holder_id}"


class KVStoreServicer(pb_grpc.KVStoreServicer):
    def __init__(
        self,
        store: BlockStore,
        index: RedisIndex | None,
        shm: SharedMemoryLayout | None,
        max_block_bytes: int,
    ) -> None:
        self.store = store
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
                if req.chunk.shm is not None:
                    if asm.in_progress:
                        raise BlockError("a shared-memory block inside another block's chunks")
                    block, path = self._adopt(req.chunk)
                    files.append(path)
                else:
                    block = asm.feed(req.chunk)
                if block is None:
                    continue
                batch.append(block)
                size += block.meta.size
                if len(batch) >= _BATCH_BLOCKS or size >= _BATCH_BYTES:
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
            refs: list[tuple[pb.BlockHeader, pb.SharedMemoryRef]] = []
            for bid in ids:
                tier = self.store.tier_of(bid)
                block = (
                    self.store.get(bid)
                    if tier == MEMORY
                    else await asyncio.to_thread(self.store.get, bid)
                )
                if block is None:
                    yield encode_get_missing(bid)
                    continue
                loc = self.store.shm_location(bid) if use_shm else None
                if loc is not None:
                    ref = pb.SharedMemoryRef(
                        path=str(loc[0]), offset=loc[1], length=block.meta.size
                    )
                    refs.append((block.meta.to_proto(), ref))
                    if len(refs) >= 256:
                        yield encode_get_batch(refs)
                        refs = []
                    continue
                for header, data, last in chunk_slices(block.meta, block.payload):
                    yield encode_get_chunk(header, data, last)
            if refs:
                yield encode_get_batch(refs)
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
        return pb.UnpinResponse(released=self.store.unpin(request.pin_id))

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


class KVStoreServer:
    """A block server: gRPC service, heartbeat thread and (optionally) the Redis index."""

    def __init__(
        self,
        memory_bytes: int,
        redis_url: str | None = None,
        disk: tuple[Path, int] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        holder_id: str | None = None,
        shm: bool | Path = True,
        lend_fraction: float = 0.5,
        max_block_bytes: int = 256 * 1024 * 1024,
        namespace: str = "splitserve",
        heartbeat_s: float = 1.0,
        ttl_s: float = 5.0,
    ) -> None:
        self.holder_id = holder_id or f"kv-{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        root = (
            shm
            if isinstance(shm, Path)
            else (default_shm_root(self.holder_id, memory_bytes) if shm else None)
        )
        self.shm = SharedMemoryLayout(root) if root else None
        if self.shm:
            self.shm.create(self.holder_id)
        self.store = BlockStore(
            self.holder_id,
            memory_bytes,
            disk,
            self.shm.blocks if self.shm else None,
            lend_fraction,
        )
        self.host, self.port = host, port
        self.redis_url = redis_url
        self.namespace = namespace
        self.heartbeat_s = heartbeat_s
        self.ttl_s = ttl_s
        self.max_block_bytes = max_block_bytes
        self.index: RedisIndex | None = None
        self.address = ""
        self._server: grpc.aio.Server | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _capacity(self) -> dict[str, int]:
        s = self.store.stats()
        return {
            "mem_capacity": s.memory_capacity,
            "mem_used": s.memory_used,
            "disk_capacity": s.disk_capacity,
            "disk_used": s.disk_used,
            "lend_capacity": s.lend_capacity,
            "lent": s.lent_bytes,
        }

    def attach(self, server: grpc.aio.Server, address: str) -> str:
        """Serve KVStore on a server someone else owns (a prefill or decode process's own gRPC
        server), reachable at `address`. Returns the service name (for health/reflection)."""
        self.address = address
        if self.redis_url:
            info = {
                "address": self.address,
                "host_id": host_id(),
                "shm_dir": str(self.shm.root) if self.shm else "",
            }
            self.index = RedisIndex(
                self.redis_url,
                self.holder_id,
                info,
                self.store.held,
                self._capacity,
                self.namespace,
                self.ttl_s,
            )
            self.store.sink = self.index
        servicer = KVStoreServicer(self.store, self.index, self.shm, self.max_block_bytes)
        add_kvstore_servicer(servicer, server)
        return SERVICE_NAME

    async def begin(self) -> None:
        """Once the server is up: adopt disk blocks, register, start heartbeats."""
        self.store.adopt_disk()
        if self.index is not None:
            await asyncio.to_thread(self.index.heartbeat)
            self._beat = threading.Thread(target=self._heartbeat_loop, daemon=True)
            self._beat.start()

    async def start(self) -> str:
        server = grpc.aio.server(options=GRPC_OPTIONS)
        self._server = server
        bound = server.add_insecure_port(f"{_bracket(self.host)}:{self.port}")
        if bound == 0:
            raise OSError(f"could not bind {self.host}:{self.port}")
        self.port = bound
        self.attach(server, f"{_bracket(self.host)}:{bound}")
        hs = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(hs, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME),
            server,
        )  # fmt: skip
        await server.start()
        await self.begin()
        await hs.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        await hs.set("", health_pb2.HealthCheckResponse.SERVING)
        self._hs = hs
        return self.address

    def _heartbeat_loop(self) -> None:
        n = 0
        while not self._stop.wait(self.heartbeat_s):
            assert self.index is not None
            if self.index.heartbeat():
                n += 1
                if n % 5 == 0:
                    self.index.janitor()

    async def stop(self, grace: float = 2.0) -> None:
        self._stop.set()
        if getattr(self, "_hs", None) is not None:
            await self._hs.enter_graceful_shutdown()
        if self.index is not None:
            await asyncio.to_thread(self.index.deregister)
        if self._server is not None:
            await self._server.stop(grace)
        if self._beat is not None:
            self._beat.join(timeout=5)
        self.store.close()
        if self.shm is not None:
            shutil.rmtree(self.shm.root, ignore_errors=True)

    async def wait(self) -> None:
        assert self._server is not None
        await self._server.wait_for_termination()


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


async def serve_forever(server: KVStoreServer, announce) -> None:
    """Run until SIGTERM/SIGINT, then leave the index before closing the port."""
    import signal

    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # before announcing: a caller may stop us at once
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, done.set)
    address = await server.start()
    announce(address)
    await done.wait()
    await server.stop()
