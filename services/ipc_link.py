"""Layer batches through GPU memory shared by CUDA IPC, for a decoder and an attention replica
on one host: gRPC carries only control, and neither host waits for its GPU.

Each side owns one buffer and one interprocess event and maps the other's. The writer fills
its buffer on its GPU stream and records its event; the reader's stream waits for that event
(cudaStreamWaitEvent) before reading. The decoder's buffer holds a batch's q, k, v; the
replica's, the partial outputs and their log-sum-exp. Reuse is safe by stream order: the
decoder writes the next batch only after its stream consumed the replica's answer to this one,
which the replica wrote after its own stream read this batch.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import torch

from kvstore.cuda_ipc import open_pool, share_buffer
from protos.splitserve.v1 import attention_pb2 as pb


@dataclass
class IpcBuffer:
    buf: torch.Tensor  # uint8 on the GPU (ours or mapped from the peer)
    event: torch.cuda.Event
    rows: int
    regions: list[torch.Tensor]  # typed views, each [rows, ...]
    link: pb.IpcLink | None = None  # ours, as the peer maps it

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
        self.event.record()

    def wait(self) -> None:
        """This side's current stream waits for what the peer last announced."""
        torch.cuda.current_stream().wait_event(self.event)


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
