"""The block store's policy without a network: LRU demotion and eviction order, pins and leases,
lending caps, the disk tier's atomic files and checksums."""

from __future__ import annotations

import pytest

from kvstore.block import BlockError, ChunkAssembler, StoredBlock, TensorSpec, chunk_messages
from kvstore.block_store import DISK, MEMORY, BlockStore
from protos.splitserve.v1 import kvstore_pb2 as pb
from tests.kv_helpers import make_blocks

KB = 1024


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class Recorder:
    """An IndexSink that records the order of index changes."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, str | None]] = []

    def added(self, entries):
        self.events += [("add", m.hex, t) for m, t in entries]

    def moved(self, meta, tier):
        self.events.append(("move", meta.hex, tier))

    def removing(self, metas):
        self.events += [("remove", m.hex, None) for m in metas]


def store(tmp_path, mem_blocks=3, disk_blocks=2, **kw) -> BlockStore:
    return BlockStore("h0", mem_blocks * 4 * KB, (tmp_path / "disk", disk_blocks * 4 * KB), **kw)


def test_demotion_then_eviction_order_is_lru(tmp_path):
    rec = Recorder()
    s = store(tmp_path, sink=rec)
    b = make_blocks(7, 4 * KB)
    s.put_many(b[:3])
    assert [s.tier_of(x.block_id) for x in b[:3]] == [MEMORY] * 3
    s.get(b[0].block_id)  # b0 becomes the most recent; b1 is now the oldest
    s.put_many([b[3]])
    assert s.tier_of(b[1].block_id) == DISK
    s.put_many([b[4]])
    assert s.tier_of(b[2].block_id) == DISK
    s.put_many([b[5]])  # memory: b0 oldest -> disk; disk full: b1 (oldest there) dropped
    assert s.tier_of(b[1].block_id) is None
    assert s.tier_of(b[0].block_id) == DISK
    assert [s.tier_of(x.block_id) for x in (b[3], b[4], b[5])] == [MEMORY] * 3
    # The index hears of a drop before the block is gone, and of a move while both copies exist.
    ev = [e for e in rec.events if e[1] == b[1].meta.hex]
    assert ev == [("add", b[1].meta.hex, MEMORY), ("move", b[1].meta.hex, DISK),
                  ("remove", b[1].meta.hex, None)]  # fmt: skip
    st = s.stats()
    assert (st.memory_blocks, st.disk_blocks, st.demotions, st.evictions) == (3, 2, 3, 1)
    assert st.memory_used == 3 * 4 * KB and st.disk_used == 2 * 4 * KB


def test_reads_are_byte_exact_from_both_tiers(tmp_path):
    s = store(tmp_path, mem_blocks=1, disk_blocks=4)
    b = make_blocks(3, 4 * KB, seed=5)
    s.put_many(b)
    for x in b:
        got = s.get(x.block_id)
        assert got is not None and bytes(got.payload) == bytes(x.payload)
        assert got.meta == x.meta


def test_pins_hold_off_eviction_until_the_lease_ends(tmp_path):
    clock = Clock()
    s = store(tmp_path, mem_blocks=2, disk_blocks=0, clock=clock)
    s.disk = None  # memory only: an unpinned victim is dropped
    b = make_blocks(4, 4 * KB)
    s.put_many(b[:2])
    _, pinned, missing = s.pin([b[0].block_id, b[1].block_id], lease_s=5.0)
    assert len(pinned) == 2 and not missing
    r = s.put_many([b[2]])
    assert r[0].status == "no_space"
    assert s.tier_of(b[0].block_id) == MEMORY
    clock.t = 4.9
    assert s.put_many([b[2]])[0].status == "no_space"
    clock.t = 5.0  # the lease ended: a crashed reader's pin no longer holds
    assert s.put_many([b[2]])[0].status == "ok"
    assert s.tier_of(b[0].block_id) is None  # the oldest went
    # An explicit unpin releases at once.
    pid, _, _ = s.pin([b[1].block_id], 60.0)
    assert s.put_many([b[3]])[0].status == "ok"  # b2 unpinned -> evicted instead of b1
    assert s.tier_of(b[1].block_id) == MEMORY and s.tier_of(b[2].block_id) is None
    assert s.unpin(pid) == 1 and not s.is_pinned(b[1].block_id)


def test_pins_extend_and_release(tmp_path):
    clock = Clock()
    s = store(tmp_path, clock=clock)
    b = make_blocks(2, 4 * KB)
    s.put_many(b)
    pid, _, _ = s.pin([b[0].block_id], 1.0)
    s.pin([b[1].block_id], 10.0, pin_id=pid)  # same id: extended and widened
    clock.t = 2.0
    assert s.is_pinned(b[0].block_id) and s.is_pinned(b[1].block_id)
    assert s.unpin(pid) == 2
    assert s.stats().pinned_blocks == 0


def test_lending_cap_protects_the_holders_own_work(tmp_path):
    s = BlockStore("h0", 8 * 4 * KB, None, lend_fraction=0.25)  # may lend 2 blocks' worth
    foreign = [StoredBlock.build(x.block_id, "m", x.payload, x.meta.tensors, owner="h9")
               for x in make_blocks(3, 4 * KB)]  # fmt: skip
    r = s.put_many(foreign)
    assert [x.status for x in r] == ["ok", "ok", "no_space"]
    assert s.stats().lent_bytes == 2 * 4 * KB
    assert s.put_many(make_blocks(4, 4 * KB, seed=9))[0].status == "ok"  # own blocks still fit


def test_corrupt_disk_file_is_caught_and_dropped(tmp_path):
    rec = Recorder()
    s = store(tmp_path, mem_blocks=1, disk_blocks=4, sink=rec)
    b = make_blocks(2, 4 * KB)
    s.put_many(b)  # b0 demoted to disk
    assert s.tier_of(b[0].block_id) == DISK
    f = s.disk.path(b[0].block_id)
    raw = bytearray(f.read_bytes())
    raw[-10] ^= 0xFF
    f.write_bytes(bytes(raw))
    assert s.get(b[0].block_id) is None
    assert s.tier_of(b[0].block_id) is None and not f.exists()
    assert ("remove", b[0].meta.hex, None) in rec.events


def test_disk_tier_survives_a_restart(tmp_path):
    s = store(tmp_path, mem_blocks=1, disk_blocks=4)
    b = make_blocks(3, 4 * KB)
    s.put_many(b)
    (tmp_path / "disk" / "junk.kv").write_bytes(b"not a block")
    rec = Recorder()
    s2 = store(tmp_path, mem_blocks=1, disk_blocks=4, sink=rec)
    s2.adopt_disk()
    assert {e[1] for e in rec.events} == {b[0].meta.hex, b[1].meta.hex}
    assert bytes(s2.get(b[1].block_id).payload) == bytes(b[1].payload)
    assert not (tmp_path / "disk" / "junk.kv").exists()


def test_chunked_stream_round_trip_and_malformed_streams():
    big = make_blocks(1, 9 * 1024 * 1024 + 3)[0]  # three chunks
    asm = ChunkAssembler()
    chunks = list(chunk_messages(big.meta, big.payload))
    assert len(chunks) == 3
    out = [asm.feed(c) for c in chunks]
    assert out[:2] == [None, None] and bytes(out[2].payload) == bytes(big.payload)

    with pytest.raises(BlockError, match="without a header"):
        ChunkAssembler().feed(pb.BlockChunk(data=b"x", last=True))
    bad = big.meta.to_proto()
    bad.size = 7
    with pytest.raises(BlockError, match="needs"):
        ChunkAssembler().feed(pb.BlockChunk(header=bad, data=b"x" * 7, last=True))
    small = make_blocks(1, 64)[0]
    h = small.meta.to_proto()
    with pytest.raises(BlockError, match="checksum"):
        ChunkAssembler().feed(pb.BlockChunk(header=h, data=b"\0" * 64, last=True))
    with pytest.raises(BlockError, match="more payload"):
        ChunkAssembler().feed(pb.BlockChunk(header=h, data=b"\0" * 65, last=True))
    h.block_id = b"short"
    with pytest.raises(BlockError, match="16 bytes"):
        ChunkAssembler().feed(pb.BlockChunk(header=h, data=bytes(small.payload), last=True))
    with pytest.raises(BlockError, match="unknown dtype"):
        StoredBlock.build(b"x" * 16, "m", b"ab", [TensorSpec("complex7", (1,))])


def test_arena_reuses_and_coalesces_extents():
    from kvstore.arena import Arena

    a = Arena(1024)
    offs = [a.alloc(256) for _ in range(4)]
    assert offs == [0, 256, 512, 768] and a.alloc(64) is None
    a.free(256, 256)
    assert a.alloc(256) == 256  # exact-size reuse
    a.free(256, 256)
    a.free(512, 256)
    assert a.alloc(500) == 256  # two neighbours coalesced, first fit
    a.write(256, b"x" * 500)
    assert bytes(a.read(256, 500)) == b"x" * 500
    assert a.alloc(100) is None


def test_mixed_sizes_evict_until_an_extent_fits(tmp_path):
    s = BlockStore("h0", 16 * KB, None)
    small = make_blocks(4, 4 * KB, seed=1)
    s.put_many(small)
    s.delete([small[0].block_id, small[2].block_id])  # 8 KiB free, but in two 4 KiB holes
    big = make_blocks(1, 8 * KB + 64, seed=2)[0]
    assert s.put_many([big])[0].status == "ok"
    assert bytes(s.get(big.block_id).payload) == bytes(big.payload)
    assert s.stats().memory_used <= 16 * KB
