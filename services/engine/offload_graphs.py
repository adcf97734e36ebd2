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
    """The L + 1 segment graphs of one batch size over fixed buffers: graph i is layer i-1's
    tail (attention output in, o projection, FFN) and layer i's head (norms, q/k/v, RoPE, the
    sends). Subclasses say where attention comes from and where q, k, v go; `after(i)` is
    optional work captured as a graph of its own that runs once layer i's batch is sent."""

    def __init__(self, model: LlamaModel, rows: int) -> None:
        self.m = model
        self.rows = rows
        cfg = model.cfg
        dev = model.w.embed.device
        self.ids = torch.zeros(rows, dtype=torch.long, device=dev)
        self.pos = torch.zeros(rows, dtype=torch.long, device=dev)
        self.group = cfg.num_heads // cfg.num_kv_heads
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.after_graphs: list[torch.cuda.CUDAGraph] = []
        self.logits: torch.Tensor | None = None

    def replay(self, i: int) -> None:
        self.graphs[i].replay()

    def replay_after(self, i: int) -> None:
        self.after_graphs[i].replay()

    # -- what subclasses provide --------------------------------------------------------------

    def input_ids(self) -> torch.Tensor:
        return self.ids

    def cache(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Where layer i's RoPE kernel writes k, v: (k cache, v cache, slot per row, -1: none)."""
        raise NotImplementedError

    def send(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Layer i's rotated q [rows, H, D] and k, v [rows, Hkv, D] into the send buffers."""
        raise NotImplementedError

    def attention(self, i: int) -> torch.Tensor:
        """Layer i's attention output [rows, H * D] in the model's dtype, from the answers."""
        raise NotImplementedError

    has_after = False  # a subclass with work after each layer's send sets it

    def after(self, i: int) -> None:
        """Work after layer i's send, captured as a graph of its own (has_after)."""

    # -- the segments -------------------------------------------------------------------------

    def _head(self, i: int, x: torch.Tensor) -> None:
        from services.engine import fused_ops

        m, cfg = self.m, self.m.cfg
        lw = m.w.layers[i]
        qkv = F.linear(x, lw.qkv, lw.qkv_bias)
        k_cache, v_cache, slots = self.cache(i)
        fused_ops.rope_and_cache(
            qkv, self.pos, m.cos_sin, k_cache, v_cache, slots,
            cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
        )  # fmt: skip
        n, d = self.rows, cfg.head_dim
        q, k, v = qkv.split((m.q_size, m.kv_size, m.kv_size), dim=-1)
        self.send(i, q.view(n, -1, d), k.view(n, -1, d), v.view(n, -1, d))

    def _tail(self, i: int, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from services.engine import fused_ops

        m, cfg = self.m, self.m.cfg
        lw = m.w.layers[i]
        o = F.linear(self.attention(i), lw.o_proj)
        x, residual = fused_ops.rms_norm(o, lw.post_norm, cfg.rms_norm_eps, residual)
        return F.linear(fused_ops.silu_mul(F.linear(x, lw.gate_up)), lw.down), residual

    def _segment(self, i: int, residual: torch.Tensor | None):
        """Graph i's work; returns the residual stream (and, last, the logits)."""
        from services.engine import fused_ops

        m, cfg = self.m, self.m.cfg
        eps, num_layers = cfg.rms_norm_eps, len(m.w.layers)
        if i == 0:
            h = F.embedding(self.input_ids(), m.w.embed)
        else:
            h, residual = self._tail(i - 1, residual)
        if i == num_layers:
            x, _ = fused_ops.rms_norm(h, m.w.norm, eps, residual)
            return residual, F.linear(x, m.w.lm_head).float()
        x, residual = fused_ops.rms_norm(h, m.w.layers[i].input_norm, eps, residual)
        self._head(i, x)
        return residual, None

    @torch.inference_mode()
    def capture(self, pool) -> None:
        num_layers = len(self.m.w.layers)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            residual = None
            for i in range(num_layers + 1):  # warm up: Triton compiles, cuBLAS picks kernels
                residual, _ = self._segment(i, residual)
                if i < num_layers and self.has_after:
                    self.after(i)
            residual = None
            for i in range(num_layers + 1):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    residual, logits = self._segment(i, residual)
                self.graphs.append(graph)
                if i < num_layers and self.has_after:
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool, stream=stream):
                        self.after(i)
                    self.after_graphs.append(graph)
            self.logits = logits
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()


class OffloadGraphSet(GraphSet):
    """Attention on attention workers: each gets its KV heads' q, k, v and answers o."""

    def __init__(self, model: LlamaModel, sends, recvs, heads, rows: int, pool) -> None:
        """sends[w]: worker w's (q, k, v) regions; recvs[w]: its o region; heads[w]: its KV
        head range."""
        super().__init__(model, rows)
        cfg = model.cfg
        dev = model.w.embed.device
        self.skip = torch.full((rows,), -1, dtype=torch.long, device=dev)
        self.dummy = torch.zeros((1, cfg.num_kv_heads, cfg.head_dim), dtype=model.w.embed.dtype,
                                 device=dev)  # fmt: skip
        self.sends, self.recvs, self.heads = sends, recvs, heads
        self.capture(pool)

    def cache(self, i: int):
        return self.dummy, self.dummy, self.skip  # the workers hold the KV

    def send(self, i: int, q, k, v) -> None:
        n, g = self.rows, self.group
        for (sq, sk, sv), (a, b) in zip(self.sends, self.heads, strict=True):
            sq[:n].copy_(q[:, a * g : b * g])
            sk[:n].copy_(k[:, a:b])
            sv[:n].copy_(v[:, a:b])

    def attention(self, i: int) -> torch.Tensor:
        n = self.rows
        parts = [o[:n] for o in self.recvs]
        attn = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return attn.reshape(n, self.m.q_size)


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
            gs = self._sets[key] = OffloadGraphSet(
                self.m, [b[:3] for b in bufs], [b[3] for b in bufs], shards.heads, size,
                self._pool,
            )  # fmt: skip
        return gs
