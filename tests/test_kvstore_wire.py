"""kvstore.wire's hand encoding is protobuf's: both directions, against the generated classes."""

from __future__ import annotations

import pytest

from kvstore import wire
from protos.splitserve.v1 import kvstore_pb2 as pb
from tests.kv_helpers import make_blocks


def _header():
    return make_blocks(1, 300)[0].meta.to_proto()


@pytest.mark.parametrize("size", [0, 1, 127, 128, 300, 70_000])
@pytest.mark.parametrize("last", [False, True])
def test_put_request_matches_protobuf(size, last):
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    h = _header()
    ours = wire.encode_put_request(h, data, last, reservation_id="r-1")
    ref = pb.PutRequest(chunk=pb.BlockChunk(header=h, data=data, last=last), reservation_id="r-1")
    assert pb.PutRequest.FromString(ours) == ref  # protobuf parses ours
    back = wire.decode_put_request(ref.SerializeToString())  # we parse protobuf's
    assert back.chunk.header == h and bytes(back.chunk.data) == data
    assert back.chunk.last == last and back.reservation_id == "r-1" and not back.error


def test_get_response_matches_protobuf():
    h = _header()
    ref_shm = pb.SharedMemoryRef(path="/dev/shm/x/blocks/ab", offset=0, length=300)
    ours = wire.encode_get_chunk(h, last=True, shm=ref_shm)
    ref = pb.GetResponse(chunk=pb.BlockChunk(header=h, last=True, shm=ref_shm))
    assert pb.GetResponse.FromString(ours) == ref
    back = wire.decode_get_response(ref.SerializeToString())
    assert back.chunk.shm == ref_shm and back.chunk.header == h and back.chunk.last
    missing = wire.encode_get_missing(b"\x01" * 16)
    assert pb.GetResponse.FromString(missing).missing_block_id == b"\x01" * 16
    assert wire.decode_get_response(missing).missing_block_id == b"\x01" * 16


def test_payload_is_a_view_not_a_copy():
    raw = wire.encode_get_chunk(None, b"x" * 1000, True)
    item = wire.decode_get_response(raw)
    assert isinstance(item.chunk.data, memoryview) and item.chunk.data.obj is raw


def test_malformed_put_is_reported_not_raised():
    assert "malformed" in wire.decode_put_request(b"\x0a\xff\xff").error
    assert "malformed" in wire.decode_put_request(b"\x0a\x05abc").error
    assert wire.decode_put_request(b"\x0a\x03\x0a\x01\xff").error  # a header that isn't one
