"""Where a holder's block bytes live: memory (optionally as shared-memory files) and disk.

The tiers only store and fetch; which block goes where, and when, is block_store's policy.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from kvstore.arena import Arena
from kvstore.block import BlockError, BlockMeta, Payload, StoredBlock
from protos.splitserve.v1 import kvstore_pb2 as pb

DISK_MAGIC = b"SSKV1\n"
_HDR = struct.Struct("<I")


@dataclass
class Entry:
    meta: BlockMeta
    payload: Payload | None  # memory tier: a view of the arena; disk: None
    offset: int = -1  # memory tier: where in the arena


class MemoryTier:
    """Blocks in RAM, in LRU order, inside one Arena. With shm_dir the arena is a tmpfs file that
    a reader on this host maps once and reads at offsets instead of streaming."""

    def __init__(self, capacity: int, shm_dir: Path | None = None) -> None:
        self.capacity = capacity
        self.used = 0
        self.shm_dir = shm_dir
        self.entries: OrderedDict[bytes, Entry] = OrderedDict()
        arena_path = None
        if shm_dir is not None:
            shm_dir.mkdir(parents=True, exist_ok=True)
            arena_path = shm_dir / "arena"
        # Slack for alignment and fragmentation; capacity accounting stays in block bytes.
        self.arena = Arena(capacity + capacity // 16 + (1 << 16), arena_path)

    def add(self, block: StoredBlock, source=None) -> bool:
        """Copy the block into the arena; False if no extent is free (evict and retry)."""
        off = self.arena.alloc(block.meta.size)
        if off is None:
            return False
        self.arena.write(off, block.payload if source is None else source)
        view = self.arena.read(off, block.meta.size)
        self.entries[block.block_id] = Entry(block.meta, view, off)
        self.used += block.meta.size
        return True

    def remove(self, block_id: bytes) -> Entry:
        e = self.entries.pop(block_id)
        self.used -= e.meta.size
        self.arena.free(e.offset, e.meta.size)
        return e

    def close(self) -> None:
        self.entries.clear()
        self.arena.close()


class DiskTier:
    """One file per block: magic, header length, header (protobuf), payload. Written to a
    temporary name and renamed, so a reader or a restart never sees half a block."""

    def __init__(self, directory: Path, capacity: int) -> None:
        self.dir = directory
        self.capacity = capacity
        self.used = 0
        self.entries: OrderedDict[bytes, Entry] = OrderedDict()
        directory.mkdir(parents=True, exist_ok=True)

    def path(self, block_id: bytes) -> Path:
        return self.dir / f"{block_id.hex()}.kv"

    def scan(self) -> list[BlockMeta]:
        """Adopt the blocks a previous run left, oldest first; drop unreadable files."""
        found = []
        files = sorted(self.dir.glob("*.kv"), key=lambda p: p.stat().st_mtime)
        for f in self.dir.glob("*.tmp*"):
            _unlink(f)
        for f in files:
            try:
                meta = _read_header(f)
                if f.name != f"{meta.hex}.kv" or self.used + meta.size > self.capacity:
                    raise BlockError("misplaced or over capacity")
            except (OSError, BlockError, ValueError):
                _unlink(f)
                continue
            self.entries[meta.block_id] = Entry(meta, None)
            self.used += meta.size
            found.append(meta)
        return found

    def add(self, block: StoredBlock) -> None:
        header = block.meta.header_bytes
        _write_atomic(
            self.path(block.block_id), [DISK_MAGIC, _HDR.pack(len(header)), header, block.payload]
        )
        self.entries[block.block_id] = Entry(block.meta, None)
        self.used += block.meta.size

    def read(self, block_id: bytes) -> StoredBlock:
        """The block's bytes, verified against its checksum (raises BlockError if corrupt)."""
        meta = self.entries[block_id].meta
        raw = self.path(block_id).read_bytes()
        start = len(DISK_MAGIC) + _HDR.size + _HDR.unpack_from(raw, len(DISK_MAGIC))[0]
        block = StoredBlock(meta, memoryview(raw)[start:])
        block.verify()
        return block

    def remove(self, block_id: bytes) -> Entry:
        e = self.entries.pop(block_id)
        self.used -= e.meta.size
        _unlink(self.path(block_id))
        return e


def _read_header(f: Path) -> BlockMeta:
    with f.open("rb") as fh:
        head = fh.read(len(DISK_MAGIC) + _HDR.size)
        if len(head) < len(DISK_MAGIC) + _HDR.size or not head.startswith(DISK_MAGIC):
            raise BlockError(f"{f}: not a block file")
        (n,) = _HDR.unpack_from(head, len(DISK_MAGIC))
        h = pb.BlockHeader()
        h.ParseFromString(fh.read(n))
        meta = BlockMeta.from_proto(h)
        if f.stat().st_size != len(DISK_MAGIC) + _HDR.size + n + meta.size:
            raise BlockError(f"{f}: truncated")
        return meta


def _write_atomic(path: Path, parts: list[Payload]) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with tmp.open("wb") as fh:
        for p in parts:
            fh.write(p)
    os.replace(tmp, path)


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
