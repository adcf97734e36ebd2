"""Where a holder's block bytes live: memory (optionally as shared-memory files) and disk.

The tiers only store and fetch; which block goes where, and when, is block_store's policy.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from kvstore.block import BlockError, BlockMeta, Payload, StoredBlock
from protos.splitserve.v1 import kvstore_pb2 as pb

DISK_MAGIC = b"SSKV1\n"
_HDR = struct.Struct("<I")


@dataclass
class Entry:
    meta: BlockMeta
    payload: Payload | None  # memory tier: the bytes (or a shared-memory map); disk: None


class MemoryTier:
    """Blocks in RAM, in LRU order. With shm_dir, each payload is a file in a tmpfs directory
    mapped read-only, so a reader on this host can map the same pages instead of streaming."""

    def __init__(self, capacity: int, shm_dir: Path | None = None) -> None:
        self.capacity = capacity
        self.used = 0
        self.shm_dir = shm_dir
        self.entries: OrderedDict[bytes, Entry] = OrderedDict()
        if shm_dir is not None:
            shm_dir.mkdir(parents=True, exist_ok=True)
            for stale in shm_dir.iterdir():  # a previous run's files: its index entries are gone
                _unlink(stale)

    def shm_path(self, block_id: bytes) -> Path | None:
        return None if self.shm_dir is None else self.shm_dir / block_id.hex()

    def add(self, block: StoredBlock, adopt_file: Path | None = None) -> None:
        payload: Payload = block.payload
        path = self.shm_path(block.block_id)
        if path is not None:
            if adopt_file is not None:
                os.replace(adopt_file, path)  # a same-host writer's file becomes ours, no copy
            else:
                _write_atomic(path, [block.payload])
            payload = _map(path, block.meta.size)
        self.entries[block.block_id] = Entry(block.meta, payload)
        self.used += block.meta.size

    def remove(self, block_id: bytes) -> Entry:
        e = self.entries.pop(block_id)
        self.used -= e.meta.size
        path = self.shm_path(block_id)
        if path is not None:
            # Readers that mapped it keep their pages; the name is gone for new ones.
            _unlink(path)
        return e


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
        header = block.meta.to_proto().SerializeToString()
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


def _map(path: Path, size: int) -> Payload:
    if size == 0:
        return b""
    with path.open("rb") as fh:
        return memoryview(mmap.mmap(fh.fileno(), size, prot=mmap.PROT_READ))


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
