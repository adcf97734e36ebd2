"""One pre-mapped region that holds a memory tier's block bytes.

Keeping each block in its own fresh allocation costs a page fault per 4 KiB on every put (the
kernel zeroes and maps new pages), which on loopback halves throughput. The arena is mapped once
and extents are reused after eviction, so steady-state puts never fault. Populating a large
budget up front would stall start-up for seconds, so a background thread pre-faults it instead,
with MADV_POPULATE_WRITE: that maps pages without touching their contents, so it is safe next to
concurrent writes.
Backed by a tmpfs file, the same region is what same-host readers map (one mapping per holder,
addressed by offset), so shared memory costs no per-block files either.

Allocation: KV blocks of one model mostly share a size, so freed extents are kept in exact-size
lists and reused first; otherwise a bump pointer; when both fail, free extents are coalesced and
searched first-fit.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
from collections import defaultdict
from pathlib import Path

import numpy as np

ALIGN = 64
# Copies up to this size go through a memoryview (half the overhead of numpy's on a 512-byte
# block); larger ones through numpy, which releases the GIL while it copies.
_SMALL_COPY = 64 * 1024
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux >= 5.14


def _round(n: int) -> int:
    return max(ALIGN, (n + ALIGN - 1) // ALIGN * ALIGN)


class Extents:
    """Offsets in a region of `capacity` bytes (this arena's, or a GPU buffer's)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._top = 0
        self._free: dict[int, list[int]] = defaultdict(list)  # extent size -> offsets
        self.allocated = 0

    def alloc(self, n: int) -> int | None:
        size = _round(n)
        offs = self._free.get(size)
        if offs:
            self.allocated += size
            return offs.pop()
        if self._top + size <= self.capacity:
            off = self._top
            self._top += size
            self.allocated += size
            return off
        return self._coalesce_and_fit(size)

    def free(self, off: int, n: int) -> None:
        size = _round(n)
        self._free[size].append(off)
        self.allocated -= size

    def _coalesce_and_fit(self, size: int) -> int | None:
        extents = sorted((off, sz) for sz, offs in self._free.items() for off in offs)
        merged: list[list[int]] = []
        for off, sz in extents:
            if merged and merged[-1][0] + merged[-1][1] == off:
                merged[-1][1] += sz
            else:
                merged.append([off, sz])
        if merged and merged[-1][0] + merged[-1][1] == self._top:
            self._top = merged.pop()[0]  # a free tail returns to the bump region
        self._free = defaultdict(list)
        for off, sz in merged:
            self._free[sz].append(off)
        if self._top + size <= self.capacity:
            off = self._top
            self._top += size
            self.allocated += size
            return off
        for off, sz in merged:
            if sz >= size:
                self._free[sz].remove(off)
                if not self._free[sz]:
                    del self._free[sz]
                if sz > size:
                    self._free[sz - size].append(off + size)
                self.allocated += size
                return off
        return None


class Arena:
    def __init__(self, capacity: int, path: Path | None = None) -> None:
        self.capacity = _round(capacity)
        self.path = path
        if path is not None:
            # A new inode, never a truncated old one: a reader that still maps a previous
            # holder's arena at this path keeps reading that one (truncating it would SIGBUS it).
            path.unlink(missing_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.ftruncate(fd, self.capacity)
                self._mm = mmap.mmap(fd, self.capacity, flags=mmap.MAP_SHARED)
            finally:
                os.close(fd)
        else:
            self._mm = mmap.mmap(-1, self.capacity, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.view = memoryview(self._mm)
        self._np = np.frombuffer(self._mm, np.uint8)
        self._closed = threading.Event()
        threading.Thread(target=self._prefault, name="arena-prefault", daemon=True).start()
        self.extents = Extents(self.capacity)
        self.alloc, self.free = self.extents.alloc, self.extents.free

    def _prefault(self, chunk: int = 64 << 20) -> None:
        for off in range(0, self.capacity, chunk):
            if self._closed.is_set():
                return
            try:
                self._mm.madvise(_MADV_POPULATE_WRITE, off, min(chunk, self.capacity - off))
            except (OSError, ValueError):  # an older kernel, or closed meanwhile: fault lazily
                return

    def write(self, off: int, data) -> None:
        src = memoryview(data).cast("B")
        if src.nbytes <= _SMALL_COPY:
            self.view[off : off + src.nbytes] = src
            return
        # numpy's copy releases the GIL, so the event loop keeps receiving during large copies.
        np.copyto(self._np[off : off + src.nbytes], np.frombuffer(src, np.uint8))

    def read(self, off: int, n: int) -> memoryview:
        return self.view[off : off + n]

    def close(self) -> None:
        self._closed.set()
        del self._np
        # A block view still held elsewhere keeps the mapping alive until it is dropped.
        with contextlib.suppress(BufferError):
            self.view.release()
            self._mm.close()
