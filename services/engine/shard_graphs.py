"""CUDA graphs of an attention worker's share of a decode layer (attention offload on a GPU).

Per layer and decode batch the worker stores the new k, v and runs the paged decode kernel:
launched op by op, a few hundred microseconds of host time in every round trip, which the model
worker waits through. Captured once per (batch tag, padded batch size, layer), a round trip
costs one replay. The graphs read q, k, v from the tag's shared input buffer and write o into
its shared answer buffer (fixed addresses, so graphs belong to one session's buffers), and take
the step's slots, block table and lengths from fixed buffers refilled once per step. Padding
rows write their garbage k, v into a scratch block past the pool and attend to nothing.
"""

from __future__ import annotations

import numpy as np
import torch

from services.engine.attention_cuda import paged_decode_attention
from services.engine.runner_cuda import graph_batch_sizes


class _Set:
    """One (tag, size): its step buffers and a graph per layer."""

    def __init__(self, size: int, width: int, scratch_slot: int, device) -> None:
        self.size = size
        self.scratch_slot = scratch_slot
        self.slots = torch.full((size,), scratch_slot, dtype=torch.long, device=device)
        self.table = torch.zeros((size, width), dtype=torch.int32, device=device)
        self.lens = torch.zeros(size, dtype=torch.int32, device=device)
        self.graphs: list[torch.cuda.CUDAGraph] = []


class ShardGraphs:
    def __init__(self, kv_cache, num_layers: int, block_size: int, scale: float,
                 num_blocks: int, max_rows: int, src, dst) -> None:  # fmt: skip
        """kv_cache: the shard's cache, whose block num_blocks is the scratch block; src, dst:
        per tag, the shared (q, k, v) regions and the answer's (o,) or (o, lse) regions (the
        log-sum-exp for a partial that is merged elsewhere)."""
        self.kv = kv_cache
        self.num_layers = num_layers
        self.bs = block_size
        self.scale = scale
        self.width = num_blocks
        self.scratch_slot = num_blocks * block_size
        self.sizes = graph_batch_sizes(max_rows)
        self.src, self.dst = src, dst
        self._sets: dict[tuple[int, int], _Set] = {}
        self._pool = None
        self._current: dict[int, tuple[_Set, int]] = {}  # tag -> (its set, rows) this step

    @torch.inference_mode()  # its buffers were made in inference mode (with the graphs)
    def begin(
        self, tag: int, slots: np.ndarray, table: np.ndarray, lens: np.ndarray, eligible: bool
    ) -> bool:
        """A batch's step on this tag: for a decode-only one (eligible), fill its graphs'
        buffers (capturing them on first use); False when no graph takes it (the caller then
        runs it op by op). table, lens: per query row; slots: per new k, v row (as many or
        fewer)."""
        self._current.pop(tag, None)
        if not eligible:
            return False
        n = len(lens)
        size = next((s for s in self.sizes if s >= n), None)
        if size is None or tag >= len(self.src) or table.shape[1] > self.width:
            return False
        key = (tag, size)
        gs = self._sets.get(key)
        if gs is None:
            gs = self._sets[key] = self._capture(tag, size)
        dev = gs.slots.device
        w = len(slots)
        gs.slots[:w].copy_(torch.from_numpy(slots).to(dev))
        gs.slots[w:].fill_(gs.scratch_slot)
        gs.table[:n, : table.shape[1]].copy_(torch.from_numpy(table.astype(np.int32)).to(dev))
        gs.lens[:n].copy_(torch.from_numpy(lens.astype(np.int32)).to(dev))
        gs.lens[n:].zero_()
        self._current[tag] = (gs, n)
        return True

    def replay(self, tag: int, layer: int) -> bool:
        """The layer of this step's batch on tag, if it runs as a graph."""
        cur = self._current.get(tag)
        if cur is None:
            return False
        cur[0].graphs[layer].replay()
        return True

    def _layer(self, gs: _Set, tag: int, layer: int) -> None:
        q, k, v = (r[: gs.size] for r in self.src[tag])
        o, *lse = (r[: gs.size] for r in self.dst[tag])
        k_cache, v_cache = self.kv.layer(layer)
        k_cache.index_copy_(0, gs.slots, k)
        v_cache.index_copy_(0, gs.slots, v)
        paged_decode_attention(
            q, k_cache, v_cache, gs.table, gs.lens, self.bs, self.scale, out=o,
            lse=lse[0] if lse else None,
        )  # fmt: skip

    @torch.inference_mode()
    def _capture(self, tag: int, size: int) -> _Set:
        gs = _Set(size, self.width, self.scratch_slot, self.kv.data.device)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            # Every slot the scratch slot, every length 0: warming up writes no real KV.
            for layer in range(self.num_layers):
                self._layer(gs, tag, layer)  # Triton compiles
            for layer in range(self.num_layers):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._pool, stream=stream):
                    self._layer(gs, tag, layer)
                gs.graphs.append(graph)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        return gs
