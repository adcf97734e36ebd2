"""A holder's device pool: KV blocks kept in GPU memory for readers on the same host.

A prefill on GPU 0 that published its KV through host memory paid a device-to-host copy per
block and the decode on GPU 1 a host-to-device copy back, at a few hundred MB/s through Python.
The pool instead keeps the blocks in one GPU allocation, shared once through CUDA IPC
(`share()`); a reader maps it (kvstore.cuda_ipc) and copies its extents GPU to GPU over NVLink
or PCIe. Blocks are hand-off buffers: each is pinned by the request that put it until the
reader unpins it or the lease ends, and an unpinned block is dropped, oldest first, when room
is needed. A reader that cannot map the pool (another host) gets the same blocks as bytes
through the ordinary Get (`read`).

Not in the Redis index: a block lives here for the seconds between prefill and decode, and the
decode request names the holder.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace

import crc32c

from kvstore.arena import Extents, _round
from kvstore.block import BlockMeta, StoredBlock
from kvstore.leases import Leases
from protos.splitserve.v1 import kvstore_pb2 as pb


@dataclass
class DeviceEntry:
    meta: BlockMeta  # crc32c 0: computed only if the bytes leave the GPU
    offset: int


class DevicePool:
    def __init__(self, capacity: int, device, clock=time.monotonic) -> None:
        import torch

        # Another device type keeps the same policy (and serves bytes through `read`), but
        # only a CUDA pool can be shared with another process.
        self.device = torch.device(device)
        self.on_cuda = self.device.type == "cuda"
        self.capacity = _round(capacity)
        self.buf = torch.empty(self.capacity, dtype=torch.uint8, device=self.device)
        self.extents = Extents(self.capacity)
        self.entries: OrderedDict[bytes, DeviceEntry] = OrderedDict()  # oldest first
        self.pool_id = uuid.uuid4().hex
        self._leases = Leases(clock)
        self._lock = threading.Lock()
        self._handle: pb.CudaIpcHandle | None = None
        self.puts = self.evictions = 0

    # -- writes -----------------------------------------------------------------------------

    def put(self, blocks: Sequence[tuple[BlockMeta, object]], pin_id: str, lease_s: float):
        """Copy (meta, GPU tensor) blocks in and pin them under pin_id; returns the ids placed
        (the others found no room: every extent is pinned) and the ids newly copied (the rest
        were here already). The copies are complete on return, so another process may read
        them at once."""
        import torch

        placed: list[bytes] = []
        new: list[bytes] = []
        # The tensors come from the engine's own stream: wait for them before reading (outside
        # the lock: this can take an engine step, and readers must not wait for it).
        if self.on_cuda:
            torch.cuda.synchronize(self.device)
        with self._lock, _on(self.device):
            self._leases.expire()
            for meta, tensor in blocks:
                bid = meta.block_id
                e = self.entries.get(bid)
                if e is None:
                    off = self._alloc(meta.size, keep=set(placed))
                    if off is None:
                        continue
                    src = tensor.detach().reshape(-1).view(torch.uint8)
                    self.buf[off : off + meta.size].copy_(src, non_blocking=True)
                    e = self.entries[bid] = DeviceEntry(meta, off)
                    new.append(bid)
                    self.puts += 1
                self.entries.move_to_end(bid)
                placed.append(bid)
            if pin_id:
                self._leases.hold(pin_id, placed, lease_s)
            if self.on_cuda:
                torch.cuda.current_stream().synchronize()
        return placed, new

    def _alloc(self, size: int, keep: set[bytes]) -> int | None:
        """An extent, evicting unpinned blocks oldest first; never one of `keep` (the blocks
        this put has placed: they are pinned only once it ends)."""
        while (off := self.extents.alloc(size)) is None:
            victim = next(
                (b for b in self.entries if not self._leases.pinned(b) and b not in keep), None
            )
            if victim is None:
                return None
            self._drop(victim)
            self.evictions += 1
        return off

    def _drop(self, bid: bytes) -> None:
        e = self.entries.pop(bid)
        self.extents.free(e.offset, e.meta.size)

    # -- reads ------------------------------------------------------------------------------

    def locate(self, ids: Sequence[bytes], pin_id: str, lease_s: float):
        """[(meta, offset)] of the ids held here, pinned under pin_id; and the absent ids."""
        with self._lock:
            self._leases.expire()
            found = [(i, self.entries[i]) for i in ids if i in self.entries]
            if pin_id:
                self._leases.hold(pin_id, [i for i, _ in found], lease_s)
            absent = [i for i in ids if i not in self.entries]
            return [(e.meta, e.offset) for _, e in found], absent

    def read(self, bid: bytes) -> StoredBlock | None:
        """A block as bytes (with its CRC), for a reader that cannot map the pool."""
        with self._lock:
            e = self.entries.get(bid)
            if e is None:
                return None
            data = self.buf[e.offset : e.offset + e.meta.size].cpu().numpy().tobytes()
        return StoredBlock(replace(e.meta, crc32c=crc32c.crc32c(data)), data)

    def share(self) -> pb.CudaIpcHandle:
        """The pool's CUDA IPC handle (made once: every reader maps the same allocation)."""
        from kvstore.cuda_ipc import share_buffer

        if not self.on_cuda:
            raise RuntimeError(f"a {self.device} pool can't be shared: CUDA IPC needs a GPU")
        with self._lock:
            if self._handle is None:
                self._handle = share_buffer(self.buf, self.pool_id, self.capacity)
            return self._handle

    # -- pins -------------------------------------------------------------------------------

    def unpin(self, pin_id: str) -> int:
        with self._lock:
            return self._leases.release(pin_id)

    @property
    def pinned_blocks(self) -> int:
        with self._lock:
            self._leases.expire()
            return self._leases.num_pinned

    @property
    def live_pins(self) -> int:
        """Pins not yet released or expired (a hand-off's, readers' in flight)."""
        with self._lock:
            self._leases.expire()
            return self._leases.num_pins


def _on(device):
    import contextlib

    import torch

    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
