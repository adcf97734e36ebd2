"""Piecewise CUDA graphs of a model worker's dense layers (attention offload on a GPU).

Between two attention round trips the model worker runs one layer's tail and the next
layer's head: o projection, norm, FFN, norm, q/k/v projection, RoPE. Launched op by op that is
a dozen kernels and most of a millisecond of host time per layer; captured once per batch size
as a graph it is one replay. Graph i reads layer i-1's attention output straight from the
attention workers' answer buffers and writes layer i's q, k, v straight into the buffers the
workers read (so a graph set belongs to one batch tag and one set of buffers: a worker replaced
means new buffers and new graphs). Graph 0 starts from the token ids; graph L ends with the
logits.

Decode batches only (one row per sequence), padded to the next captured size; padding rows
compute garbage that no worker reads and no sampler sees.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from services.engine.model import LlamaModel


class GraphSet:
    """The L + 1 graphs of one (tag, batch size) over fixed buffers."""

    def __init__(self, model: LlamaModel, sends, recvs, heads, rows: int, pool) -> None:
        """sends[w]: worker w's (q, k, v) regions; recvs[w]: its o region; heads[w]: its KV
        head range."""
        self.m = model
        self.rows = rows
        cfg = model.cfg
        dev = model.w.embed.device
        self.ids = torch.zeros(rows, dtype=torch.long, device=dev)
        self.pos = torch.zeros(rows, dtype=torch.long, device=dev)
        self.skip = torch.full((rows,), -1, dtype=torch.long, device=dev)
        self.dummy = torch.zeros((1, cfg.num_kv_heads, cfg.head_dim), dtype=model.w.embed.dtype,
                                 device=dev)  # fmt: skip
        self.sends, self.recvs, self.heads = sends, recvs, heads
        self.group = cfg.num_heads // cfg.num_kv_heads
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.logits: torch.Tensor | None = None
        self._capture(pool)

    def replay(self, i: int) -> None:
        self.graphs[i].replay()

    # -- the segments -------------------------------------------------------------------------

    def _head(self, i: int, x: torch.Tensor) -> None:
        """Layer i's q, k, v of the normed x, rotated, into the workers' send buffers."""
        from services.engine import fused_ops

        m, cfg = self.m, self.m.cfg
        lw = m.w.layers[i]
        qkv = F.linear(x, lw.qkv, lw.qkv_bias)
        fused_ops.rope_and_cache(
            qkv, self.pos, m.cos_sin, self.dummy, self.dummy, self.skip,
            cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
        )  # fmt: skip
        n, d = self.rows, cfg.head_dim
        q, k, v = qkv.split((m.q_size, m.kv_size, m.kv_size), dim=-1)
        q, k, v = q.view(n, -1, d), k.view(n, -1, d), v.view(n, -1, d)
        g = self.group
        for (sq, sk, sv), (a, b) in zip(self.sends, self.heads, strict=True):
            sq[:n].copy_(q[:, a * g : b * g])
            sk[:n].copy_(k[:, a:b])
            sv[:n].copy_(v[:, a:b])

    def _tail(self, i: int, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's o projection and FFN over the workers' answers: (h, residual)."""
        from services.engine import fused_ops

        m, cfg = self.m, self.m.cfg
        lw = m.w.layers[i]
        n = self.rows
        parts = [o[:n] for o in self.recvs]
        attn = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        o = F.linear(attn.reshape(n, m.q_size), lw.o_proj)
        x, residual = fused_ops.rms_norm(o, lw.post_norm, cfg.rms_norm_eps, residual)
        return F.linear(fused_ops.silu_mul(F.linear(x, lw.gate_up)), lw.down), residual

    def _segment(self, i: int, residual: torch.Tensor | None):
        """Graph i's work; returns the residual stream (and, last, the logits)."""
        from services.engine import fused_ops

        m, cfg = self.m, self.m.cfg
        eps, num_layers = cfg.rms_norm_eps, len(m.w.layers)
        if i == 0:
            h = F.embedding(self.ids, m.w.embed)
        else:
            h, residual = self._tail(i - 1, residual)
        if i == num_layers:
            x, _ = fused_ops.rms_norm(h, m.w.norm, eps, residual)
            return residual, F.linear(x, m.w.lm_head).float()
        x, residual = fused_ops.rms_norm(h, m.w.layers[i].input_norm, eps, residual)
        self._head(i, x)
        return residual, None

    @torch.inference_mode()
    def _capture(self, pool) -> None:
        num_layers = len(self.m.w.layers)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            residual = None
            for i in range(num_layers + 1):  # warm up: Triton compiles, cuBLAS picks kernels
                residual, _ = self._segment(i, residual)
            residual = None
            for i in range(num_layers + 1):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    residual, logits = self._segment(i, residual)
                self.graphs.append(graph)
            self.logits = logits
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()


class OffloadGraphs:
    """Graph sets by (batch tag, padded batch size), for the shards' current buffers."""

    def __init__(self, model: LlamaModel, sizes: list[int]) -> None:
        self.m = model
        self.sizes = sizes
        self._sets: dict[tuple[int, int], GraphSet] = {}
        self._generation = -1
        self._pool = None

    def get(self, shards, tag: int, n: int) -> GraphSet | None:
        """The graphs for a decode batch of n rows on batch tag `tag`, captured on first use;
        None where they can't serve it (no shared buffers, too many rows)."""
        size = next((s for s in self.sizes if s >= n), None)
        if size is None:
            return None
        bufs = [shards.buffers(w, tag) for w in range(len(shards.heads))]
        if any(b is None or len(b[3]) < size for b in bufs):
            return None
        if shards.generation != self._generation:  # new buffers: the old graphs read stale ones
            self._sets.clear()
            self._generation = shards.generation
        key = (tag, size)
        gs = self._sets.get(key)
        if gs is None:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            gs = self._sets[key] = GraphSet(
                self.m, [b[:3] for b in bufs], [b[3] for b in bufs], shards.heads, size,
                self._pool,
            )  # fmt: skip
        return gs
