"""Layer batches through memory shared on one host, for a decoder and a lender: gRPC carries
only control.

Each side owns one buffer and maps the other's. The decoder's buffer holds a batch's q, k, v;
the lender's, the partial outputs and their log-sum-exp. On GPUs the buffers are CUDA IPC
allocations with an interprocess event each: the writer fills its buffer on its stream and
records its event, the reader's stream waits for that event (cudaStreamWaitEvent), so neither
host waits for its GPU. Reuse is safe by stream order: the decoder writes the next batch only
after its stream consumed the lender's answer to this one, which the lender wrote after its
own stream read this batch. On CPUs they are files in /dev/shm, and the messages order them:
a batch is written before the message that announces it is sent.
"""

from __future__ import annotations

import mmap
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from kvstore.cuda_ipc import open_pool, share_buffer
from protos.splitserve.v1 import attention_pb2 as pb


@dataclass
class IpcBuffer:
    buf: torch.Tensor  # uint8: on the GPU, or over a shared-memory file (ours or the peer's)
    event: torch.cuda.Event | None  # None for shared memory
    rows: int
    regions: list[torch.Tensor]  # typed views, each [rows, ...]
    link: pb.IpcLink | None = None  # ours, as the peer maps it
    _file: tuple[mmap.mmap, Path | None] | None = None  # shared memory: its map, ours to unlink

    @classmethod
    def create_shm(cls, rows: int, layout, root: Path = Path("/dev/shm")) -> IpcBuffer:
        """A shared-memory buffer (a file under root, unlinked by close())."""
        nbytes = _size(rows, layout)
        path = root / f"splitserve-ipc-{uuid.uuid4().hex}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, nbytes)
            mm = mmap.mmap(fd, nbytes)
        finally:
            os.close(fd)
        buf = torch.frombuffer(mm, dtype=torch.uint8)
        link = pb.IpcLink(rows=rows, shm_path=str(path))
        return cls(buf, None, rows, _carve(buf, rows, layout), link, (mm, path))

    @classmethod
    def open_shm(cls, link: pb.IpcLink, layout) -> IpcBuffer:
        """The peer's shared-memory buffer. Raises OSError where the file isn't reachable
        (another host) and ValueError if it is too small."""
        nbytes = _size(link.rows, layout)
        fd = os.open(link.shm_path, os.O_RDWR)
        try:
            if os.fstat(fd).st_size < nbytes:
                raise ValueError("the peer's buffer is smaller than its rows need")
            mm = mmap.mmap(fd, nbytes)
        finally:
            os.close(fd)
        buf = torch.frombuffer(mm, dtype=torch.uint8)
        return cls(buf, None, link.rows, _carve(buf, link.rows, layout), None, (mm, None))

    def unlink(self) -> None:
        """Remove our shared-memory file once the peer has it mapped: the mapping lives on,
        and no file is left behind if either process dies."""
        if self._file is not None and self._file[1] is not None:
            self._file[1].unlink(missing_ok=True)
            self._file = (self._file[0], None)

    close = unlink  # the mapping goes when the last tensor over it does

    @classmethod
    def create(
        cls, device: torch.device, rows: int, layout: list[tuple[torch.dtype, tuple[int, ...]]]
    ) -> IpcBuffer:
        """A buffer of `rows` rows of each (dtype, row shape) region, and its event."""
        nbytes = _size(rows, layout)
        buf = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        event = torch.cuda.Event(interprocess=True)
        link = pb.IpcLink(
            buffer=share_buffer(buf, uuid.uuid4().hex, nbytes),
            event=bytes(event.ipc_handle()),
            rows=rows,
        )
        return cls(buf, event, rows, _carve(buf, rows, layout), link)

    @classmethod
    def open(cls, link: pb.IpcLink, layout: list[tuple[torch.dtype, tuple[int, ...]]]) -> IpcBuffer:
        """The peer's buffer, mapped here. Raises (RuntimeError, LookupError) where CUDA can't
        map it: another host, an invisible GPU, or this very process."""
        buf = open_pool(link.buffer)
        if buf.numel() < _size(link.rows, layout):
            raise ValueError("the peer's buffer is smaller than its rows need")
        event = torch.cuda.Event.from_ipc_handle(buf.device, link.event)
        return cls(buf, event, link.rows, _carve(buf, link.rows, layout))

    def ready(self) -> None:
        """What this side wrote to its buffer on its current stream is for the peer now."""
        if self.event is not None:
            self.event.record()

    def wait(self, host: bool = False) -> None:
        """This side's current stream waits for what the peer last announced; host: this
        thread waits instead, and only then queues work that reads it. With two processes on
        one GPU, work queued behind another context's event can hold the GPU's time slice
        while it waits; queued only once it can run, it lets the peer's context run meanwhile
        (attention offload measured ~15% faster steps on an H200 this way)."""
        if self.event is not None:
            if host:
                self.event.synchronize()
            else:
                torch.cuda.current_stream().wait_event(self.event)


def use_device(device: str) -> None:
    """On a thread that records and waits for a link's events: the pool's GPU, where there is
    one named ("cuda" alone means the current device already)."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev)


def _size(rows: int, layout) -> int:
    return sum(rows * _row_bytes(dt, shape) for dt, shape in layout)


def _row_bytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    n = torch.empty((), dtype=dtype).element_size()
    for d in shape:
        n *= d
    return n


def _carve(buf: torch.Tensor, rows: int, layout) -> list[torch.Tensor]:
    out, off = [], 0
    for dtype, shape in layout:
        nbytes = rows * _row_bytes(dtype, shape)
        # Regions start on 256-byte boundaries when the row sizes are multiples of 256.
        out.append(buf[off : off + nbytes].view(dtype).view(rows, *shape))
        off += nbytes
    return out


def decoder_layout(num_heads, num_kv_heads, head_dim, dtype):
    """q, k, v."""
    return [
        (dtype, (num_heads, head_dim)),
        (dtype, (num_kv_heads, head_dim)),
        (dtype, (num_kv_heads, head_dim)),
    ]


def replica_layout(num_heads, head_dim):
    """out, lse (float32)."""
    return [(torch.float32, (num_heads, head_dim)), (torch.float32, (num_heads,))]
