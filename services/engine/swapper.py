"""Runs the swap copies (services.engine.swap_space.SwapOp) between the KV cache and a host
buffer.

The host buffer is block-major, [num_host_blocks, L, 2, block_size, Hkv, D] (pinned on CUDA), so
a run of host blocks is one contiguous range: a grouped copy is one gather (or scatter) on the
device and one DMA over the bus, whatever the number of layers.

- synchronous (mode "swap", vLLM's former swap): one copy per block per layer and K/V, issued
  on the compute stream before the step (the step waits for them, as vLLM's did);
- asynchronous (mode "fastswitch"): a worker thread of its own issues each op on a CUDA stream
  of its own, after an event recorded on the compute stream when the op was submitted (so the
  KV the previous steps wrote is complete), and records an end event. done(op) polls it; the
  scheduler returns swapped-out blocks to the pool, and schedules swapped-in requests, only
  once their op is done. On a CPU the worker thread does the copies itself.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from services.engine.kv_cache import KVCache
from services.engine.swap_space import SwapOp


class Swapper:
    def __init__(self, kv: KVCache, num_host_blocks: int, asynchronous: bool) -> None:
        self.kv = kv
        data = kv.data
        self.device = data.device
        self.cuda = self.device.type == "cuda"
        _, _, _, bs, h, d = data.shape
        shape = (num_host_blocks, data.shape[0], 2, bs, h, d)
        self.host = torch.zeros(shape, dtype=data.dtype, pin_memory=self.cuda)
        self.block_bytes = self.host[0].numel() * self.host.element_size()
        self.asynchronous = asynchronous
        self._pool: ThreadPoolExecutor | None = None
        self._stream = None
        if asynchronous:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="kv-swap")
            if self.cuda:
                self._stream = torch.cuda.Stream(device=self.device)
        self._pending: dict[int, Future] = {}
        self._lock = threading.Lock()
        # Measured: blocks moved and the time the copies took (device time on CUDA).
        self.blocks_copied = 0
        self.copy_s = 0.0
        self.num_ops = 0

    @property
    def bytes_copied(self) -> int:
        return self.blocks_copied * self.block_bytes

    def submit(self, ops: list[SwapOp]) -> None:
        """Start the ops, in order (an op never overtakes an earlier one)."""
        for op in ops:
            self.num_ops += 1
            if self._pool is None:
                self._run_sync(op)
                continue
            ready = None
            if self.cuda:
                ready = torch.cuda.Event()
                ready.record()  # on the compute stream: what was launched so far
            self._pending[op.op_id] = self._pool.submit(self._run_async, op, ready)

    def done(self, op_id: int) -> bool:
        """The op's copies are complete (an unknown id: long done)."""
        fut = self._pending.get(op_id)
        if fut is None:
            return True
        if not fut.done():
            return False
        res = fut.result()  # a failed copy raises here, on the engine's thread
        if self.cuda:
            start, end, _keep = res
            if not end.query():
                return False
            self.copy_s += start.elapsed_time(end) / 1e3
        del self._pending[op_id]
        return True

    def wait(self, op_id: int, timeout_s: float) -> bool:
        """Wait up to timeout_s for an op (sleeping, so the copy thread has the GIL)."""
        deadline = time.monotonic() + timeout_s
        while not self.done(op_id):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.0002)
        return True

    def wait_all(self) -> None:
        for op_id in list(self._pending):
            fut = self._pending[op_id]
            res = fut.result()
            if self.cuda:
                res[1].synchronize()
            self.done(op_id)

    def close(self) -> None:
        if self._pool is not None:
            self.wait_all()
            self._pool.shutdown(wait=True)
            self._pool = None

    # -- the copies ------------------------------------------------------------------------

    def _run_sync(self, op: SwapOp) -> None:
        """vLLM's swap: per block, per layer, K and V, in the compute stream's order."""
        data, host = self.kv.data, self.host
        t0 = time.perf_counter()
        start = end = None
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        for dev_b, host_b, n in op.runs:
            for k in range(n):
                for layer in range(data.shape[0]):
                    for kv in (0, 1):
                        src = data[layer, kv, dev_b + k]
                        dst = host[host_b + k, layer, kv]
                        if op.to_host:
                            dst.copy_(src, non_blocking=self.cuda)
                        else:
                            src.copy_(dst, non_blocking=self.cuda)
        self.blocks_copied += op.num_blocks
        if self.cuda:
            end.record()
            end.synchronize()  # synchronous: the scheduler loop waits, as vLLM's did
            self.copy_s += start.elapsed_time(end) / 1e3
        else:
            self.copy_s += time.perf_counter() - t0

    def _run_async(self, op: SwapOp, ready):
        if not self.cuda:
            t0 = time.perf_counter()
            self._copy_runs(op)
            with self._lock:
                self.copy_s += time.perf_counter() - t0
                self.blocks_copied += op.num_blocks
            return None
        torch.cuda.set_device(self.device)  # per thread
        stream = self._stream
        with torch.cuda.stream(stream):
            stream.wait_event(ready)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            keep = self._copy_runs(op)
            end.record(stream)
        with self._lock:
            self.blocks_copied += op.num_blocks
        # The temporaries live until the end event is seen done (done() drops them).
        return start, end, keep

    def _copy_runs(self, op: SwapOp) -> list[torch.Tensor]:
        """One copy per run: the device blocks' [L, 2, n, ...] view against n host blocks."""
        data, host = self.kv.data, self.host
        keep = []
        for dev_b, host_b, n in op.runs:
            dev_view = data[:, :, dev_b : dev_b + n]  # [L, 2, n, bs, H, D], strided
            host_view = host[host_b : host_b + n]  # [n, L, 2, bs, H, D], contiguous
            if not self.cuda:
                if op.to_host:
                    host_view.copy_(dev_view.permute(2, 0, 1, 3, 4, 5))
                else:
                    dev_view.copy_(host_view.permute(1, 2, 0, 3, 4, 5))
                continue
            if op.to_host:
                tmp = dev_view.permute(2, 0, 1, 3, 4, 5).contiguous()  # gather on the device
                host_view.copy_(tmp, non_blocking=True)  # one DMA
            else:
                tmp = host_view.to(self.device, non_blocking=True)  # one DMA
                dev_view.copy_(tmp.permute(1, 2, 0, 3, 4, 5))  # scatter on the device
            keep.append(tmp)
        return keep
