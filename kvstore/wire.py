"""The block-carrying KVStore messages, encoded and decoded by hand around the payload.

These are ordinary protobuf messages on the wire (any protobuf client reads and writes them), but
going through generated classes would copy every payload several times: into the message, out of
it, and again when Python reads the field. Here the payload is joined once into the outgoing
message and read back as a memoryview slice of the incoming one: no copy. Only the small header
and shared-memory reference go through the generated classes. tests/test_kvstore_wire.py checks
both directions against protobuf's own encoder and parser.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.message import DecodeError

from protos.splitserve.v1 import kvstore_pb2 as pb

# Field numbers from kvstore.proto (BlockChunk, PutRequest, GetResponse).
_CHUNK_HEADER, _CHUNK_DATA, _CHUNK_LAST, _CHUNK_SHM = 1, 2, 3, 4
_PUT_CHUNK, _PUT_RESERVATION = 1, 2
_GET_CHUNK, _GET_MISSING, _GET_BATCH = 1, 2, 3
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


@dataclass
class Chunk:
    """A decoded BlockChunk: data is a view into the received message."""

    header: pb.BlockHeader | None = None
    data: memoryview | bytes = b""
    last: bool = False
    shm: pb.SharedMemoryRef | None = None

    @classmethod
    def from_pb(cls, c: pb.BlockChunk) -> Chunk:
        return cls(
            header=c.header if c.HasField("header") else None,
            data=c.data,
            last=c.last,
            shm=c.shm if c.HasField("shm") else None,
        )


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _chunk_parts(header: bytes | None, data, last: bool, shm: bytes | None) -> list:
    parts: list = []
    if header is not None:
        parts += [_key(_CHUNK_HEADER, _LEN), _varint(len(header)), header]
    n = memoryview(data).nbytes
    if n:
        parts += [_key(_CHUNK_DATA, _LEN), _varint(n), data]
    if last:
        parts += [_key(_CHUNK_LAST, _VARINT), b"\x01"]
    if shm is not None:
        parts += [_key(_CHUNK_SHM, _LEN), _varint(len(shm)), shm]
    return parts


def _wrap(field: int, parts: list) -> list:
    n = sum(memoryview(p).nbytes for p in parts)
    return [_key(field, _LEN), _varint(n), *parts]


def encode_chunk_message(
    field: int,
    header: pb.BlockHeader | bytes | None,
    data=b"",
    last: bool = False,
    shm: pb.SharedMemoryRef | None = None,
    extra: bytes = b"",
) -> bytes:
    h = header.SerializeToString() if isinstance(header, pb.BlockHeader) else header
    s = shm.SerializeToString() if shm is not None else None
    return b"".join([*_wrap(field, _chunk_parts(h, data, last, s)), extra])


def encode_put_request(
    header: pb.BlockHeader | bytes | None,
    data=b"",
    last: bool = False,
    shm: pb.SharedMemoryRef | None = None,
    reservation_id: str = "",
) -> bytes:
    extra = b""
    if reservation_id:
        r = reservation_id.encode()
        extra = _key(_PUT_RESERVATION, _LEN) + _varint(len(r)) + r
    return encode_chunk_message(_PUT_CHUNK, header, data, last, shm, extra)


def encode_get_chunk(
    header: pb.BlockHeader | bytes | None,
    data=b"",
    last: bool = False,
    shm: pb.SharedMemoryRef | None = None,
) -> bytes:
    return encode_chunk_message(_GET_CHUNK, header, data, last, shm)


def encode_get_batch(refs: list[tuple[pb.BlockHeader, pb.SharedMemoryRef]]) -> bytes:
    """Several shared-memory references in one GetResponse."""
    parts: list = []
    for header, shm in refs:
        parts += _wrap(
            _GET_BATCH, _chunk_parts(header.SerializeToString(), b"", True, shm.SerializeToString())
        )
    return b"".join(parts)


def encode_get_missing(block_id: bytes) -> bytes:
    return _key(_GET_MISSING, _LEN) + _varint(len(block_id)) + block_id


def serialize(msg) -> bytes:
    """gRPC serializer that passes pre-encoded messages through."""
    return msg if isinstance(msg, bytes) else msg.SerializeToString()


class WireError(ValueError):
    pass


def _read_varint(mv: memoryview, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if i >= len(mv) or shift > 63:
            raise WireError("truncated or overlong varint")
        b = mv[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


def _fields(mv: memoryview):
    """(field number, wire type, value) of each field; LEN values are memoryview slices."""
    i = 0
    while i < len(mv):
        key, i = _read_varint(mv, i)
        field, wire = key >> 3, key & 7
        if wire == _VARINT:
            v, i = _read_varint(mv, i)
        elif wire == _LEN:
            n, i = _read_varint(mv, i)
            if i + n > len(mv):
                raise WireError("length-delimited field runs past the message")
            v, i = mv[i : i + n], i + n
        elif wire == _I64:
            v, i = mv[i : i + 8], i + 8
        elif wire == _I32:
            v, i = mv[i : i + 4], i + 4
        else:
            raise WireError(f"unsupported wire type {wire}")
        if i > len(mv):
            raise WireError("field runs past the message")
        yield field, wire, v


def _decode_chunk(mv: memoryview) -> Chunk:
    c = Chunk()
    for field, wire, v in _fields(mv):
        if field == _CHUNK_HEADER and wire == _LEN:
            c.header = pb.BlockHeader.FromString(bytes(v))
        elif field == _CHUNK_DATA and wire == _LEN:
            c.data = v
        elif field == _CHUNK_LAST and wire == _VARINT:
            c.last = bool(v)
        elif field == _CHUNK_SHM and wire == _LEN:
            c.shm = pb.SharedMemoryRef.FromString(bytes(v))
    return c


@dataclass
class PutItem:
    chunk: Chunk
    reservation_id: str = ""
    error: str = ""  # a message that could not be parsed: the servicer answers INVALID_ARGUMENT


@dataclass
class GetItem:
    chunk: Chunk | None = None
    missing_block_id: bytes = b""
    batch: list[Chunk] | None = None


def decode_put_request(raw: bytes) -> PutItem:
    """Never raises: gRPC would turn a deserializer's exception into INTERNAL."""
    item = PutItem(Chunk())
    try:
        for field, wire, v in _fields(memoryview(raw)):
            if field == _PUT_CHUNK and wire == _LEN:
                item.chunk = _decode_chunk(v)
            elif field == _PUT_RESERVATION and wire == _LEN:
                item.reservation_id = bytes(v).decode()
    except (WireError, DecodeError, UnicodeDecodeError) as e:
        item.error = f"malformed PutRequest: {e}"
    return item


def decode_get_response(raw: bytes) -> GetItem:
    item = GetItem()
    for field, wire, v in _fields(memoryview(raw)):
        if field == _GET_CHUNK and wire == _LEN:
            item.chunk = _decode_chunk(v)
        elif field == _GET_MISSING and wire == _LEN:
            item.missing_block_id = bytes(v)
        elif field == _GET_BATCH and wire == _LEN:
            if item.batch is None:
                item.batch = []
            item.batch.append(_decode_chunk(v))
    return item
