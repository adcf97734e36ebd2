"""One pre-mapped region that holds a memory tier's block bytes.

Keeping each block in its own fresh allocation costs a page fault per 4 KiB on every put (the
kernel zeroes and maps new pages), which on loopback halves throughput. The arena is mapped and
populated once; blocks are copied into extents of it and extents are reused after eviction.
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
from collections import defaultdict
from pathlib import Path

ALIGN = 64


def _round(n: int) -> int:
    return max(ALIGN, (n + ALIGN - 1) // ALIGN * ALIGN)


class Arena:
    def __init__(self, capacity: int, path: Path | None = None) -> None:
        self.capacity = _round(capacity)
        self.path = path
        populate = getattr(mmap, "MAP_POPULATE", 0)
        if path is not None:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.ftruncate(fd, self.capacity)
                self._mm = mmap.mmap(fd, self.capacity, flags=mmap.MAP_SHARED | populate)
            finally:
                os.close(fd)
        else:
            flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | populate
            self._mm = mmap.mmap(-1, self.capacity, flags=flags)
        self.view = memoryview(self._mm)
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

    def write(self, off: int, data) -> None:
        src = memoryview(data).cast("B")
        self.view[off : off + src.nbytes] = src

    def read(self, off: int, n: int) -> memoryview:
        return self.view[off : off + n]

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

    def close(self) -> None:
        # A block view still held elsewhere keeps the mapping alive until it is dropped.
        with contextlib.suppress(BufferError):
            self.view.release()
            self._mm.close()
