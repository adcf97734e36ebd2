"""kvstore.wire's hand encoding is protobuf's: both directions, against the generated classes."""

from __future__ import annotations

import pytest

from kvstore import wire
from kvstore.block import BATCH_BLOCKS, BATCH_BYTES, message_groups
from protos.splitserve.v1 import kvstore_pb2 as pb
from tests.kv_helpers import make_blocks

MB = 1 << 20


def _header():
    return make_blocks(1, 300)[0].meta.to_proto()


# Up to wire.C_PARSE_MAX_BYTES a message is parsed by protobuf's C parser, past it by hand.
@pytest.mark.parametrize("size", [0, 1, 127, 128, 300, 70_000, 2 * MB])
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


@pytest.mark.parametrize("size", [512, 700 * 1024])  # a batch parsed in C, one walked by hand
def test_batches_match_protobuf(size):
    blocks = make_blocks(3, size)
    whole = [(b.meta.header_bytes, b.payload, None) for b in blocks]
    ref_chunks = [
        pb.BlockChunk(header=b.meta.to_proto(), data=bytes(b.payload), last=True) for b in blocks
    ]
    ours = wire.encode_put_batch(whole, reservation_id="r-2")
    ref = pb.PutRequest(batch=ref_chunks, reservation_id="r-2")
    assert pb.PutRequest.FromString(ours) == ref
    back = wire.decode_put_request(ref.SerializeToString())
    assert back.chunk is None and back.reservation_id == "r-2" and not back.error
    assert [(c.header, bytes(c.data), c.last) for c in back.chunks] == [
        (c.header, c.data, True) for c in ref_chunks
    ]
    ref_get = pb.GetResponse(batch=ref_chunks)
    assert pb.GetResponse.FromString(wire.encode_get_batch(whole)) == ref_get
    got = wire.decode_get_response(ref_get.SerializeToString())
    assert [(c.header, bytes(c.data)) for c in got.chunks] == [
        (c.header, c.data) for c in ref_chunks
    ]


def test_message_groups_batch_small_blocks_and_send_big_ones_alone():
    small, big = make_blocks(600, 512), make_blocks(1, BATCH_BYTES)
    groups = list(message_groups(small[:300] + big + small[300:]))
    # 256 blocks a message at most; the big block alone splits the run in two.
    assert [len(g) for g in groups] == [256, 44, 1, 256, 44]
    assert groups[2] == big
    mid = make_blocks(40, 100 * 1024)  # 10 of these fill a message's BATCH_BYTES
    assert [len(g) for g in message_groups(mid)] == [10, 10, 10, 10]
    # The largest batch the encoders make is parsed in C (see wire.C_PARSE_MAX_BYTES).
    full = make_blocks(BATCH_BLOCKS, BATCH_BYTES // BATCH_BLOCKS)
    msg = wire.encode_put_batch([(b.meta.header_bytes, b.payload, None) for b in full], "r" * 32)
    assert len(msg) < wire.C_PARSE_MAX_BYTES


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


def test_a_big_chunks_payload_is_a_view_not_a_copy():
    # Messages past wire.C_PARSE_MAX_BYTES carry a big block's chunk: its payload is not copied.
    raw = wire.encode_get_chunk(None, b"x" * (2 * MB), True)
    item = wire.decode_get_response(raw)
    assert isinstance(item.chunk.data, memoryview) and item.chunk.data.obj is raw
    raw = wire.encode_put_request(None, b"x" * (2 * MB), True)
    put = wire.decode_put_request(raw)
    assert isinstance(put.chunk.data, memoryview) and put.chunk.data.obj is raw


def test_malformed_put_is_reported_not_raised():
    assert "malformed" in wire.decode_put_request(b"\x0a\xff\xff").error
    assert "malformed" in wire.decode_put_request(b"\x0a\x05abc").error
    assert wire.decode_put_request(b"\x0a\x03\x0a\x01\xff").error  # a header that isn't one
