"""A stored KV block: content id, layout and raw payload, with its checksum.

The store never interprets the payload; it checks that the layout accounts for every byte and that
the CRC32C matches, so a block is either delivered exactly or not at all.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property, lru_cache

import crc32c as _crc32c

from kvstore.wire import Chunk
from protos.splitserve.v1 import kvstore_pb2 as pb
from rpc.tensor import DTYPE_SIZES, TensorSpec

BLOCK_ID_BYTES = 16
# Payload bytes per stream message: under the 16 MiB message limit both ends set, and large enough
# that per-message overhead is small.
CHUNK_BYTES = 4 * 1024 * 1024
# Blocks smaller than BATCH_BYTES travel whole, several to a message (up to BATCH_BYTES of payload
# and BATCH_BLOCKS blocks): gRPC costs ~100 us of CPU per message, far more than a 512-byte or
# 8 KiB block's bytes.
BATCH_BYTES = 1024 * 1024
BATCH_BLOCKS = 256
Payload = bytes | bytearray | memoryview


class BlockError(ValueError):
    """A block that is malformed: wrong id, layout that does not match its payload, bad checksum."""


Layout = tuple[TensorSpec, ...]

# A model's blocks share a handful of tensor layouts, so each layout is read, checked and
# serialized once, not once per block (the header is most of a small block's per-block cost).


@lru_cache(maxsize=1024)
def _layout_nbytes(tensors: Layout) -> int:
    """The payload bytes a layout describes; BlockError for a layout no payload can have."""
    if not tensors:
        raise BlockError("no tensor layout")
    for t in tensors:
        if not t.known:
            raise BlockError(f"unknown dtype {t.dtype!r}; known: {', '.join(DTYPE_SIZES)}")
        if any(d < 0 for d in t.shape):
            raise BlockError(f"negative dimension in shape {t.shape}")
    return sum(t.nbytes for t in tensors)


@lru_cache(maxsize=1024)
def _layout_from_proto(key: tuple[tuple[str, tuple[int, ...], str], ...]) -> Layout:
    return tuple(TensorSpec(dtype, shape, name) for dtype, shape, name in key)


@lru_cache(maxsize=1024)
def _layout_header_bytes(tensors: Layout) -> bytes:
    """The layout as BlockHeader fields, to append to the rest of a serialized header (protobuf
    reads fields in any order)."""
    return pb.BlockHeader(tensors=[t.to_pb() for t in tensors]).SerializeToString()


@dataclass(frozen=True)
class BlockMeta:
    """Everything about a block but its bytes."""

    block_id: bytes
    model_id: str
    tensors: tuple[TensorSpec, ...]
    size: int
    crc32c: int
    token_ids: tuple[int, ...] = ()
    owner: str = ""

    @property
    def hex(self) -> str:
        return self.block_id.hex()

    @cached_property
    def header_bytes(self) -> bytes:
        """The serialized BlockHeader, made once: every message that carries the block has it."""
        rest = pb.BlockHeader(
            block_id=self.block_id,
            model_id=self.model_id,
            token_ids=self.token_ids,
            size=self.size,
            crc32c=self.crc32c,
            owner=self.owner,
        )
        return rest.SerializeToString() + _layout_header_bytes(self.tensors)

    def to_proto(self) -> pb.BlockHeader:
        return pb.BlockHeader(
            block_id=self.block_id,
            model_id=self.model_id,
            token_ids=self.token_ids,
            tensors=[t.to_pb() for t in self.tensors],
            size=self.size,
            crc32c=self.crc32c,
            owner=self.owner,
        )

    @classmethod
    def from_proto(cls, h: pb.BlockHeader, max_block_bytes: int | None = None) -> BlockMeta:
        meta = cls(
            block_id=bytes(h.block_id),
            model_id=h.model_id,
            tensors=_layout_from_proto(tuple((t.dtype, tuple(t.shape), t.name) for t in h.tensors)),
            size=h.size,
            crc32c=h.crc32c,
            token_ids=tuple(h.token_ids),
            owner=h.owner,
        )
        meta.validate(max_block_bytes)
        return meta

    def validate(self, max_block_bytes: int | None = None) -> None:
        if len(self.block_id) != BLOCK_ID_BYTES:
            raise BlockError(f"block id must be {BLOCK_ID_BYTES} bytes, got {len(self.block_id)}")
        try:
            expected = _layout_nbytes(self.tensors)
        except BlockError as e:
            raise BlockError(f"block {self.hex}: {e}") from None
        if expected != self.size:
            raise BlockError(
                f"block {self.hex}: layout "
                f"{[(t.dtype, t.shape) for t in self.tensors]} needs {expected} bytes, "
                f"header says {self.size}"
            )
        if max_block_bytes is not None and self.size > max_block_bytes:
            raise OversizeBlockError(
                f"block {self.hex}: {self.size} bytes exceeds the limit of {max_block_bytes}"
            )


class OversizeBlockError(BlockError):
    pass


def crc32c(data: Payload) -> int:
    return _crc32c.crc32c(data)


@dataclass(frozen=True)
class StoredBlock:
    meta: BlockMeta
    payload: Payload = field(repr=False)

    @property
    def block_id(self) -> bytes:
        return self.meta.block_id

    @classmethod
    def build(
        cls,
        block_id: bytes,
        model_id: str,
        payload: Payload,
        tensors: Sequence[TensorSpec],
        token_ids: Sequence[int] = (),
        owner: str = "",
    ) -> StoredBlock:
        """A block with its size and checksum computed from the payload."""
        mv = memoryview(payload).cast("B")
        meta = BlockMeta(
            block_id=bytes(block_id),
            model_id=model_id,
            tensors=tuple(tensors),
            size=mv.nbytes,
            crc32c=crc32c(mv),
            token_ids=tuple(token_ids),
            owner=owner,
        )
        meta.validate()
        return cls(meta, mv)

    def verify(self) -> None:
        n = memoryview(self.payload).nbytes
        if n != self.meta.size:
            raise BlockError(f"block {self.meta.hex}: payload has {n} bytes, header says "
                             f"{self.meta.size}")  # fmt: skip
        if crc32c(self.payload) != self.meta.crc32c:
            raise BlockError(f"block {self.meta.hex}: checksum mismatch (corrupted payload)")


def chunk_messages(meta: BlockMeta, payload: Payload) -> Iterator[pb.BlockChunk]:
    """The stream messages for one block: the header rides on the first."""
    mv = memoryview(payload).cast("B")
    n = mv.nbytes
    if n <= CHUNK_BYTES:
        # bytes(mv) of a bytes object's view is the one copy protobuf needs anyway.
        yield pb.BlockChunk(header=meta.to_proto(), data=_as_bytes(payload, mv), last=True)
        return
    for off in range(0, n, CHUNK_BYTES):
        end = min(off + CHUNK_BYTES, n)
        yield pb.BlockChunk(
            header=meta.to_proto() if off == 0 else None,
            data=mv[off:end].tobytes(),
            last=end == n,
        )


def _as_bytes(payload: Payload, mv: memoryview) -> bytes:
    return payload if isinstance(payload, bytes) else mv.tobytes()


def chunk_slices(
    meta: BlockMeta, payload: Payload
) -> Iterator[tuple[bytes | None, memoryview, bool]]:
    """(serialized header on the first piece, payload slice, last) for the wire encoders."""
    mv = memoryview(payload).cast("B")
    n = mv.nbytes
    header = meta.header_bytes
    if n == 0:
        yield header, mv, True
        return
    for off in range(0, n, CHUNK_BYTES):
        end = min(off + CHUNK_BYTES, n)
        yield (header if off == 0 else None), mv[off:end], end == n


def message_groups(blocks: Iterable[StoredBlock]) -> Iterator[list[StoredBlock]]:
    """Consecutive blocks, one stream message's worth at a time: small blocks several to a group
    (whole, in a batch), a block of BATCH_BYTES or more alone (it travels as chunk_slices)."""
    group: list[StoredBlock] = []
    size = 0
    for b in blocks:
        n = b.meta.size
        if n >= BATCH_BYTES:
            if group:
                yield group
                group, size = [], 0
            yield [b]
            continue
        if len(group) >= BATCH_BLOCKS or size + n > BATCH_BYTES:
            yield group
            group, size = [], 0
        group.append(b)
        size += n
    if group:
        yield group


class ChunkAssembler:
    """Reassembles blocks from a stream of chunks, validating the stream's shape."""

    def __init__(self, max_block_bytes: int | None = None, verify: bool = True) -> None:
        """verify=False leaves the CRC check to the caller (a server checks in its storing
        thread, off the event loop)."""
        self.max_block_bytes = max_block_bytes
        self.verify = verify
        self._meta: BlockMeta | None = None
        self._parts: list[bytes | memoryview] = []
        self._received = 0

    def feed(self, chunk: Chunk | pb.BlockChunk) -> StoredBlock | None:
        """Add one chunk; returns the block when it is complete. Raises BlockError."""
        if isinstance(chunk, pb.BlockChunk):
            chunk = Chunk.from_pb(chunk)
        if chunk.header is not None:
            if self._meta is not None:
                raise BlockError(f"block {self._meta.hex}: a new header before its last chunk")
            self._meta = BlockMeta.from_proto(chunk.header, self.max_block_bytes)
        elif self._meta is None:
            raise BlockError("a chunk without a header starts a block")
        meta = self._meta
        if len(chunk.data):
            self._received += len(chunk.data)
            if self._received > meta.size:
                raise BlockError(f"block {meta.hex}: more payload than its header's {meta.size} B")
            self._parts.append(chunk.data)
        if not chunk.last:
            return None
        if self._received != meta.size:
            raise BlockError(
                f"block {meta.hex}: {self._received} payload bytes, header says {meta.size}"
            )
        payload = (
            self._parts[0]
            if len(self._parts) == 1
            else (b"".join(self._parts) if self._parts else b"")
        )
        self._meta, self._parts, self._received = None, [], 0
        block = StoredBlock(meta, payload)
        if self.verify:
            block.verify()
        return block

    @property
    def in_progress(self) -> bool:
        return self._meta is not None
