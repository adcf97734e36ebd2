"""A holder's shared-memory directory on this host: its layout, its lifetime lock, and the
clean-up of directories whose holder died.

Same-host readers map the memory tier's arena from here and same-host writers leave payloads in
`incoming/`; kvstore.transport is the other side of both.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

PREFIX = "splitserve-"


def host_id() -> str:
    """The host a holder (and its shared memory) lives on, as published in the index."""
    return socket.gethostname()


@dataclass
class SharedMemoryLayout:
    """A holder's tmpfs directory: blocks/arena (the memory tier's arena, which same-host readers
    map), incoming/ (same-host writers put files here and hand them over by name), a marker
    naming the holder, by which a client proves it sees the same files (same host and mounts),
    and a lock file the holder keeps flock'ed while it lives. The kernel drops that lock when
    the process dies, however it dies, so the next holder to start can tell a dead holder's
    directory (a pre-faulted arena the size of its memory budget) and remove it."""

    root: Path
    _lock_fd: int | None = None

    @property
    def blocks(self) -> Path:
        return self.root / "blocks"

    @property
    def incoming(self) -> Path:
        return self.root / "incoming"

    @property
    def marker(self) -> Path:
        return self.root / "holder"

    @property
    def lock(self) -> Path:
        return self.root / "lock"

    def create(self, holder_id: str) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RuntimeError(f"{self.root} belongs to a running holder") from None
        self._lock_fd = fd  # held for the holder's life
        self.incoming.mkdir(parents=True, exist_ok=True)
        for f in self.incoming.iterdir():
            f.unlink(missing_ok=True)
        self.marker.write_text(holder_id)

    def release(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def remove_dead_holders(base: Path, prefix: str = PREFIX) -> list[Path]:
    """Remove holder directories under base whose lock no live process holds; returns them.
    A directory without a lock file (being created, or from an older version) is left alone."""
    removed = []
    for d in base.glob(f"{prefix}*"):
        try:
            fd = os.open(d / "lock", os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
        except BlockingIOError:
            pass  # its holder is alive
        finally:
            os.close(fd)
    return removed


def default_shm_root(holder_id: str, memory_bytes: int) -> Path | None:
    """/dev/shm when it exists and can hold the memory budget (containers often give 64 MiB).
    Dead holders' directories there are removed first, so their arenas don't count against it.
    The process id is in the name: two holders of one id (two clusters on one host) never share."""
    base = Path("/dev/shm")
    for d in remove_dead_holders(base) if base.is_dir() else ():
        log.info("removed %s: its holder is gone", d)
    try:
        st = os.statvfs(base)
    except OSError:
        return None
    if not os.access(base, os.W_OK) or st.f_bavail * st.f_frsize < memory_bytes:
        return None
    return base / f"{PREFIX}{holder_id}-{os.getpid()}"
