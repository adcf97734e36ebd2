"""CudaIpcTransport: blocks from a same-host holder's device pool, GPU to GPU.

The holder answers GetDevice with its pool's CUDA IPC handle and each block's extent; this
process maps the pool once (per pool id) and copies the extents onto its own device with
`copy_`, which runs as a peer copy over NVLink or PCIe. Blocks the pool doesn't have, and
holders without a pool or whose GPU this process can't see, go through the fallback transport
(shared memory or the stream).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator

import grpc

from kvstore.block import BlockMeta, StoredBlock
from kvstore.index import HolderInfo
from kvstore.transport import GetItem, Transport, unpin_later
from protos.splitserve.v1 import kvstore_pb2 as pb

log = logging.getLogger(__name__)


class DeviceBlock(StoredBlock):
    """A block whose payload is a uint8 tensor on this process's GPU. Not re-checked: its bytes
    went from one GPU's memory to another's without a socket (see SharedMemoryTransport)."""


class CudaIpcTransport:
    name = "cuda_ipc"
    trusted = True

    def __init__(self, device, fallback: Transport, lease_ms: int = 10_000) -> None:
        import torch

        self.device = torch.device(device)
        self.fallback = fallback
        self.lease_ms = lease_ms
        self._pools: dict[str, object] = {}  # pool id -> the mapped pool (a uint8 tensor)
        self._unusable: set[str] = set()  # holder ids: no pool, or its GPU isn't visible here

    def reaches(self, holder: HolderInfo) -> bool:
        return holder.holder_id not in self._unusable and self.fallback.reaches(holder)

    async def put(self, stub, holder, blocks, reservation_id, budget):
        return await self.fallback.put(stub, holder, blocks, reservation_id, budget)

    async def get(self, stub, holder, ids, budget, copy=True) -> AsyncIterator[GetItem]:
        rest = list(ids)
        if holder.holder_id not in self._unusable:
            pin_id = uuid.uuid4().hex
            try:
                resp = await stub.GetDevice(
                    pb.GetDeviceRequest(block_ids=ids, pin_id=pin_id, lease_ms=self.lease_ms),
                    timeout=budget.base_s,
                )
            except grpc.aio.AioRpcError as e:
                if e.code() not in (
                    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNIMPLEMENTED
                ):  # fmt: skip
                    raise
                self._unusable.add(holder.holder_id)
                resp = None
            if resp is not None:
                try:
                    # In a worker thread: the first map of a pool sets up a CUDA context on the
                    # holder's GPU (seconds), and the copies release the GIL.
                    got = await asyncio.to_thread(self._copy, resp)
                except (RuntimeError, LookupError) as e:  # can't map it here: say so once
                    log.warning("device pool of %s not usable here (%s): reading it as bytes",
                                holder.holder_id, e)  # fmt: skip
                    self._unusable.add(holder.holder_id)
                    got = []
                finally:
                    unpin_later(stub, pin_id, budget.base_s)
                done = {b.block_id for b in got}
                rest = [i for i in ids if i not in done]
                for b in got:
                    yield b
        if rest:
            async for item in self.fallback.get(stub, holder, rest, budget, copy):
                yield item

    def _copy(self, resp: pb.GetDeviceResponse) -> list[DeviceBlock]:
        """Each extent copied onto this process's device; complete on return (the holder may
        reuse the extents once unpinned)."""
        import torch

        if not resp.extents:
            return []
        pool = self._map(resp.handle)
        out = []
        with torch.cuda.device(self.device):
            for ext in resp.extents:
                meta = BlockMeta.from_proto(ext.header)
                if ext.offset + meta.size > pool.numel():
                    raise LookupError(f"block {meta.hex}: extent past the device pool's end")
                dst = torch.empty(meta.size, dtype=torch.uint8, device=self.device)
                dst.copy_(pool[ext.offset : ext.offset + meta.size], non_blocking=True)
                out.append(DeviceBlock(meta, dst))
            torch.cuda.current_stream().synchronize()
        return out

    def _map(self, h: pb.CudaIpcHandle):
        pool = self._pools.get(h.pool_id)
        if pool is None:
            pool = self._pools[h.pool_id] = open_pool(h)
        return pool


def share_buffer(buf, pool_id: str, nbytes: int) -> pb.CudaIpcHandle:
    """A CUDA IPC handle to a uint8 GPU tensor's allocation, for another process to map with
    open_pool (the same process can't: CUDA refuses to open its own handles)."""
    import torch

    (_, handle, size, offset, rc_handle, rc_offset, ev_handle, ev_sync) = (
        buf.untyped_storage()._share_cuda_()
    )
    return pb.CudaIpcHandle(
        pool_id=pool_id,
        device_uuid=str(torch.cuda.get_device_properties(buf.device).uuid),
        handle=handle,
        storage_size=size,
        storage_offset=offset,
        ref_counter_handle=rc_handle or b"",
        ref_counter_offset=rc_offset or 0,
        event_handle=ev_handle or b"",
        event_sync_required=bool(ev_sync),
        pool_bytes=nbytes,
    )


def open_pool(h: pb.CudaIpcHandle):
    """The holder's pool as a uint8 tensor in this process (on the holder's GPU)."""
    import torch

    index = _device_index(h.device_uuid)
    with torch.cuda.device(index):
        storage = torch.UntypedStorage._new_shared_cuda(
            index,
            h.handle,
            h.storage_size,
            h.storage_offset,
            h.ref_counter_handle or None,
            h.ref_counter_offset,
            h.event_handle or None,
            h.event_sync_required,
        )
        t = torch.empty(0, dtype=torch.uint8, device=f"cuda:{index}")
        t.set_(storage, 0, (h.pool_bytes,), (1,))
    return t


def _device_index(device_uuid: str) -> int:
    import torch

    for i in range(torch.cuda.device_count()):
        if str(torch.cuda.get_device_properties(i).uuid) == device_uuid:
            return i
    raise LookupError(f"GPU {device_uuid} is not visible to this process")
