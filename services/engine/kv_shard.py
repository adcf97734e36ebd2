"""An attention worker's share of one model worker's KV (attention offload, Lamina).

It holds KV heads [head_start, head_end) of every block of the model worker's pool, at the
block ids the model worker's scheduler chose. Per step and layer it stores the new k, v at
their slots and attends the batch's queries of its heads with the engine's own attention
backend (the colocated engine's kernels, so the outputs are the colocated engine's). A q-first
batch is attended in two parts: the cached prefix when q comes, the new token's term when k, v
follow, merged by log-sum-exp.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from services.engine.attention import AttentionMetadata, PrefillSeq
from services.engine.config import ModelConfig
from services.engine.kv_cache import KVCache
from services.engine.kv_holder import SegmentError
from services.engine.offload_plan import StepLayout
from services.engine.partial_attention import SegmentBatch, partial_attention

if TYPE_CHECKING:
    from services.engine.shard_graphs import ShardGraphs


@dataclass
class _Step:
    layout: StepLayout
    meta: AttentionMetadata
    prefix: SegmentBatch | None  # q-first: each decode's blocks, its query seeing keys < len-1
    # q-first: the layer whose q came, its q and the prefix partial (out, lse)
    q_layer: int = -1
    q: torch.Tensor | None = None
    partial: tuple[torch.Tensor, torch.Tensor] | None = None


class KVShard:
    def __init__(
        self,
        cfg: ModelConfig,
        head_start: int,
        head_end: int,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: str = "cpu",
    ) -> None:
        if not 0 <= head_start < head_end <= cfg.num_kv_heads:
            raise SegmentError(
                f"KV heads [{head_start}, {head_end}) are not within the model's {cfg.num_kv_heads}"
            )
        if num_blocks < 1:
            raise SegmentError(f"num_blocks must be positive, got {num_blocks}")
        self.heads = (head_start, head_end)
        hs = head_end - head_start
        self.group = cfg.num_heads // cfg.num_kv_heads
        self.cfg = dataclasses.replace(cfg, num_kv_heads=hs, num_heads=hs * self.group)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dtype = dtype
        self.device = device
        on_gpu = torch.device(device).type == "cuda"
        # On a GPU one more block: the scratch block graphs' padding rows write to.
        self.kv_cache = KVCache.allocate(
            self.cfg, num_blocks + on_gpu, block_size, dtype, device
        )  # fmt: skip
        self.scale = cfg.head_dim**-0.5
        self.graphs: ShardGraphs | None = None  # decode layers as CUDA graphs, once enabled
        if on_gpu:
            from services.engine.attention_cuda import CudaAttentionBackend

            self.backend = CudaAttentionBackend()
        else:
            from services.engine.attention_cpu import TorchAttentionBackend

            self.backend = TorchAttentionBackend()
        self._steps: dict[int, _Step] = {}
        self.hashes: dict[int, bytes] = {}  # block id -> the hash of the full content it holds

    @staticmethod
    def bytes_for(cfg: ModelConfig, num_heads: int, num_blocks: int, bs: int, dtype) -> int:
        full = KVCache.bytes_per_block(cfg, bs, dtype) * num_blocks
        return full * num_heads // cfg.num_kv_heads

    @property
    def nbytes(self) -> int:
        return self.kv_cache.data.numel() * self.kv_cache.data.element_size()

    def begin_step(self, tag: int, layout: StepLayout) -> None:
        """Check a batch's layout against this pool and prepare its attention metadata."""
        self._steps.pop(tag, None)  # a layout that fails leaves no stale one behind
        slots = self.num_blocks * self.block_size
        n = layout.num_rows
        if n == 0:
            raise SegmentError("a step with no rows")
        if layout.slot_mapping.min() < 0 or layout.slot_mapping.max() >= slots:
            raise SegmentError(f"a slot is outside this pool's {slots} slots")
        tables = [layout.decode_table] + [p.table for p in layout.prefills if p.table is not None]
        for t in tables:
            if t.size and (t.min() < 0 or t.max() >= self.num_blocks):
                raise SegmentError(f"a block id is outside this pool's {self.num_blocks} blocks")
        nd = layout.num_decode
        if layout.decode_table.shape[0] != nd or len(layout.decode_lens) != nd:
            raise SegmentError(f"{nd} decodes need as many block-table rows and lengths")
        if nd and (layout.decode_lens.min() < 1 or layout.decode_lens.max() > self.block_size *
                   layout.decode_table.shape[1]):  # fmt: skip
            raise SegmentError("a decode's length does not fit its block table")
        row = nd
        for p in layout.prefills:
            if p.query_start != row or p.num_query < 1 or p.seq_len < p.num_query:
                raise SegmentError(f"prefill chunk {p} does not follow the rows before it")
            if p.table is not None and len(p.table) * self.block_size < p.seq_len:
                raise SegmentError(f"prefill chunk {p}: its block table is too short")
            row += p.num_query
        if row != n:
            raise SegmentError(f"{n} slots for {row} rows")
        if layout.q_first and layout.prefills:
            raise SegmentError("q first is for decode-only batches")
        for bid, h in layout.cached:
            if not 0 <= bid < self.num_blocks or len(h) != 16:
                raise SegmentError(f"cached block {bid}: not a block of this pool or a bad hash")
            self.hashes[bid] = h
        for bid in set((layout.slot_mapping // self.block_size).tolist()):
            self.hashes.pop(bid, None)  # written again: whatever it held is not there now
        dev = torch.device(self.device)
        on_gpu = dev.type == "cuda"

        def t(a, dtype=torch.long):
            return torch.from_numpy(a).to(dtype).to(dev, non_blocking=True)

        table = t(layout.decode_table, torch.int32 if on_gpu else torch.long) if nd else None
        lens = mask = None
        if nd and on_gpu:
            lens = t(layout.decode_lens, torch.int32)
        elif nd:
            lens = t(layout.decode_lens)
            width = layout.decode_table.shape[1] * self.block_size
            valid = torch.arange(width)[None, :] < torch.from_numpy(layout.decode_lens)[:, None]
            mask = valid[:, None, None, :]
        meta = AttentionMetadata(
            num_decode=nd,
            slot_mapping=t(layout.slot_mapping),
            decode_block_table=table,
            decode_mask=mask,
            prefills=tuple(
                PrefillSeq(
                    p.query_start, p.num_query, p.seq_len, None if p.table is None else t(p.table)
                )
                for p in layout.prefills
            ),
            scale=self.scale,
            block_size=self.block_size,
            decode_context_lens=lens,
        )
        prefix = None
        if layout.q_first:
            bs = self.block_size
            segs = []
            for r in range(nd):
                seen = int(layout.decode_lens[r]) - 1  # keys before the new token
                nblk = -(-seen // bs)
                blocks = layout.decode_table[r, :nblk].tolist()
                segs.append((seen - 1, 1, blocks, list(range(nblk))))
            prefix = SegmentBatch.build(segs, dev)
        self._steps[tag] = _Step(layout, meta, prefix)
        if self.graphs is not None:
            decodes_only = nd == n and not layout.q_first
            self.graphs.begin(
                tag, layout.slot_mapping, layout.decode_table, layout.decode_lens, decodes_only
            )

    def load_blocks(self, block_ids: list[int], kv: torch.Tensor) -> None:
        """Write handed-off KV: kv [n, L, 2, T, heads, D], this shard's heads of the first T
        tokens of each block."""
        c = self.cfg
        if kv.dim() != 6 or len(block_ids) != kv.shape[0] or kv.shape[1:3] != (c.num_layers, 2):
            raise SegmentError(f"kv of shape {tuple(kv.shape)} for {len(block_ids)} blocks")
        if kv.shape[3] > self.block_size or kv.shape[4:] != (c.num_kv_heads, c.head_dim):
            raise SegmentError(f"kv of shape {tuple(kv.shape)} does not fit this pool's blocks")
        if kv.dtype != self.dtype:
            raise SegmentError(f"kv is {kv.dtype}, this pool holds {self.dtype}")
        if any(not 0 <= b < self.num_blocks for b in block_ids):
            raise SegmentError(f"a block id is outside this pool's {self.num_blocks} blocks")
        kv = kv.to(self.device)
        for i, b in enumerate(block_ids):
            self.kv_cache.data[:, :, b, : kv.shape[3]].copy_(kv[i])
            self.hashes.pop(b, None)

    def forget_steps(self) -> None:
        """Its model worker went away: no step of its is in flight any more, and its shared
        buffers (which the graphs read and write) are gone."""
        self._steps.clear()
        self.graphs = None

    def enable_graphs(self, src: list, dst: list, max_rows: int) -> None:
        """On a GPU: run decode batches' layers as CUDA graphs over these shared buffers (per
        tag: the (q, k, v) and (o,) regions of max_rows rows)."""
        if self.kv_cache.data.is_cuda:
            from services.engine.fused_ops import HAS_TRITON
            from services.engine.shard_graphs import ShardGraphs

            if not HAS_TRITON:
                return
            self.graphs = ShardGraphs(
                self.kv_cache, self.cfg.num_layers, self.block_size, self.scale,
                self.num_blocks, max_rows, src, dst,
            )  # fmt: skip

    def replay(self, tag: int, layer: int, rows: int) -> bool:
        """The layer of batch `tag` as a graph, if this step's batch runs as one: its rows
        must be the layout's."""
        step = self._step(tag, layer)
        if self.graphs is None or rows != step.layout.num_rows:
            return False
        return self.graphs.replay(tag, layer)

    def attend(
        self, tag: int, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """Store k, v and attend q: o [N, Hs*G, D] in the pool's dtype."""
        step = self._step(tag, layer)
        self._check(step, q, k, v)
        k_cache, v_cache = self.kv_cache.layer(layer)
        out, _ = self.backend.forward(
            q.to(self.device), k.to(self.device), v.to(self.device), k_cache, v_cache, step.meta
        )
        return out

    def attend_q(self, tag: int, layer: int, q: torch.Tensor) -> None:
        """q first: attend the cached prefix now; attend_kv finishes the layer."""
        step = self._step(tag, layer)
        if not step.layout.q_first:
            raise SegmentError("q came alone for a batch that is not q-first")
        self._check(step, q)
        q = q.to(self.device)
        k_cache, v_cache = self.kv_cache.layer(layer)
        assert step.prefix is not None
        step.partial = partial_attention(
            q, k_cache, v_cache, step.prefix, self.block_size, self.scale
        )
        step.q_layer, step.q = layer, q

    def attend_kv(self, tag: int, layer: int, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store the new k, v and fold the new token's own term into the prefix partial."""
        step = self._step(tag, layer)
        if step.q_layer != layer or step.q is None or step.partial is None:
            raise SegmentError(f"k, v of layer {layer} came before its q")
        q, (out, lse) = step.q, step.partial
        step.q = step.partial = None
        step.q_layer = -1
        k, v = k.to(self.device), v.to(self.device)
        self._check(step, q, k, v)
        k_cache, v_cache = self.kv_cache.layer(layer)
        slots = step.meta.slot_mapping
        k_cache.index_copy_(0, slots, k)
        v_cache.index_copy_(0, slots, v)
        g = self.group
        kr = k.float().repeat_interleave(g, dim=1)  # [N, H, D]
        s_new = (q.float() * kr).sum(-1) * self.scale  # [N, H]
        total = torch.logaddexp(lse, s_new)
        w_old = torch.exp(lse - total).nan_to_num(0.0).unsqueeze(-1)
        w_new = torch.exp(s_new - total).unsqueeze(-1)
        return (out * w_old + v.float().repeat_interleave(g, dim=1) * w_new).to(self.dtype)

    def _step(self, tag: int, layer: int) -> _Step:
        step = self._steps.get(tag)
        if step is None:
            raise SegmentError(f"a layer batch of batch {tag} came before its layout")
        if not 0 <= layer < self.cfg.num_layers:
            raise SegmentError(f"layer {layer} is outside [0, {self.cfg.num_layers})")
        return step

    def _check(self, step: _Step, q: torch.Tensor, *kv: torch.Tensor) -> None:
        cfg, n = self.cfg, step.layout.num_rows
        want_q = (n, cfg.num_heads, cfg.head_dim)
        want_kv = (n, cfg.num_kv_heads, cfg.head_dim)
        if tuple(q.shape) != want_q:
            raise SegmentError(f"q has shape {tuple(q.shape)}, this batch needs {want_q}")
        for name, x in zip(("k", "v"), kv, strict=False):
            if tuple(x.shape) != want_kv:
                raise SegmentError(f"{name} has shape {tuple(x.shape)}, this batch needs {want_kv}")
        for name, x in zip(("q", "k", "v"), (q, *kv), strict=False):
            if x.dtype != self.dtype:
                raise SegmentError(f"{name} is {x.dtype}, this pool holds {self.dtype}")
