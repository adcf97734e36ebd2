"""The model worker's forward pass with attention on attention workers (Lamina).

Per layer and batch: norm, q/k/v projection and RoPE here; q, k, v of each worker's KV heads
out; its heads' attention output back; o projection, norm and FFN here. Two things hide the
round trips:

- q first: q is projected, rotated and sent before k and v are projected, so the workers
  attend the cached prefix meanwhile and merge the new token's term last (decode batches);
- ping-pong (rotational staggered pipelining with two batches): the step is split into two
  batches, and while one's attention runs remotely the other's dense layers run here:
  pre(A,0) pre(B,0) | post(A,0) pre(A,1) | post(B,0) pre(B,1) | post(A,1) ...
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from services.engine.model import LlamaModel, rms_norm
from services.engine.offload_graphs import GraphSet, OffloadGraphs
from services.engine.offload_plan import AttentionShards, MicroBatch, OffloadCounters, PendingOut


class _Batch:
    """One micro-batch's activations as they go through the layers."""

    def __init__(self, mb: MicroBatch, h: torch.Tensor, positions: torch.Tensor) -> None:
        self.mb = mb
        self.h = h
        self.positions = positions
        self.residual: torch.Tensor | None = None  # the fused path's running residual
        self.pending: list[PendingOut] = []
        self.sent_at = 0.0
        self.graphs: GraphSet | None = None  # a decode batch's captured dense layers


class OffloadForward:
    def __init__(
        self, model: LlamaModel, shards: AttentionShards, counters: OffloadCounters,
        graph_sizes: list[int] | None = None,
    ) -> None:  # fmt: skip
        """graph_sizes: decode batch sizes to capture the dense layers of as CUDA graphs
        (fused path only; None or empty: none)."""
        self.m = model
        self.shards = shards
        self.c = counters
        self.graphs = OffloadGraphs(model, graph_sizes) if graph_sizes and model.fused else None
        cfg = model.cfg
        self.group = cfg.num_heads // cfg.num_kv_heads
        self._dummy_cache: torch.Tensor | None = None
        self._skip: dict[int, torch.Tensor] = {}  # by rows: every slot -1 (write no cache)

    @torch.inference_mode()
    def __call__(
        self, input_ids: torch.Tensor, positions: torch.Tensor, batches: list[MicroBatch]
    ) -> torch.Tensor:
        """Logits (float32) of every batch's logits rows, batch after batch."""
        t0 = time.perf_counter()
        m = self.m
        h = F.embedding(input_ids, m.w.embed)
        for mb in batches:
            self.shards.begin_step(mb.tag, mb.layout)
        live = [
            _Batch(mb, h[mb.row_start : mb.row_end], positions[mb.row_start : mb.row_end])
            for mb in batches
        ]
        num_layers = len(m.w.layers)
        for b in live:
            self._graph_inputs(b, input_ids)
        for b in live:
            self._pre(b, 0)
        for i in range(num_layers):
            for b in live:
                self._post(b, i)
                if i + 1 < num_layers:
                    self._pre(b, i + 1)
        logits = torch.cat([self._logits(b) for b in live]) if live else None
        self.c.steps += 1
        self.c.step_seconds += time.perf_counter() - t0
        self.c.token_layers += len(input_ids) * num_layers
        return logits

    def _graph_inputs(self, b: _Batch, input_ids: torch.Tensor) -> None:
        """Use captured graphs for a decode batch that can (its ids and positions go to the
        graphs' inputs, padding rows zero)."""
        lay, n = b.mb.layout, b.mb.row_end - b.mb.row_start
        if self.graphs is None or lay.q_first or lay.num_decode != n:
            return
        gs = self.graphs.get(self.shards, b.mb.tag, n)
        if gs is None:
            return
        gs.ids[:n].copy_(input_ids[b.mb.row_start : b.mb.row_end])
        gs.pos[:n].copy_(b.positions)
        gs.ids[n:].zero_()
        gs.pos[n:].zero_()
        b.graphs = gs

    def _pre(self, b: _Batch, i: int) -> None:
        m, cfg = self.m, self.m.cfg
        if b.graphs is not None:  # layer i-1's tail and layer i's head, in one replay
            b.graphs.replay(i)
            n = b.mb.row_end - b.mb.row_start
            b.pending = [
                self.shards.send_ready(w, b.mb.tag, i, n) for w in range(len(self.shards.heads))
            ]
            self.c.bytes_sent += n * (m.q_size + 2 * m.kv_size) * m.w.embed.element_size()
            b.sent_at = time.perf_counter()
            return
        lw = m.w.layers[i]
        if m.fused:
            from services.engine import fused_ops

            x, b.residual = fused_ops.rms_norm(b.h, lw.input_norm, cfg.rms_norm_eps, b.residual)
        else:
            x = rms_norm(b.h, lw.input_norm, cfg.rms_norm_eps)
        n, d = x.shape[0], cfg.head_dim
        if b.mb.layout.q_first:
            bias = lw.qkv_bias
            q = F.linear(x, lw.qkv[: m.q_size], None if bias is None else bias[: m.q_size])
            q = m.rope.rotate(b.positions, q.view(n, cfg.num_heads, d))
            b.pending = [
                self.shards.send_q(w, b.mb.tag, i, self._heads(q, w, self.group))
                for w in range(len(self.shards.heads))
            ]
            kv = F.linear(x, lw.qkv[m.q_size :], None if bias is None else bias[m.q_size :])
            k, v = kv.view(n, 2, cfg.num_kv_heads, d).unbind(1)
            k = m.rope.rotate(b.positions, k)
            for w in range(len(self.shards.heads)):
                self.shards.send_kv(w, b.mb.tag, i, self._heads(k, w), self._heads(v, w))
            self.c.bytes_sent += _nbytes(q, k, v)
            b.sent_at = time.perf_counter()
            return
        qkv = F.linear(x, lw.qkv, lw.qkv_bias)
        if m.fused:
            q, k, v = self._rope_fused(qkv, b.positions)
        else:
            q, k, v = qkv.split((m.q_size, m.kv_size, m.kv_size), dim=-1)
            q, k = m.rope(b.positions, q.view(n, -1, d), k.view(n, -1, d))
            v = v.view(n, -1, d)
        b.pending = [
            self.shards.send(
                w,
                b.mb.tag,
                i,
                self._heads(q, w, self.group),
                self._heads(k, w),
                self._heads(v, w),
            )
            for w in range(len(self.shards.heads))
        ]
        self.c.bytes_sent += _nbytes(q, k, v)
        b.sent_at = time.perf_counter()

    def _post(self, b: _Batch, i: int) -> None:
        m, cfg = self.m, self.m.cfg
        lw = m.w.layers[i]
        t0 = time.perf_counter()
        parts = [p.result() for p in b.pending]
        t1 = time.perf_counter()
        self.c.wait_seconds += t1 - t0
        self.c.round_trips += 1
        self.c.round_trip_seconds += t1 - b.sent_at
        if b.graphs is not None:  # the next replay reads the answers where they are
            self.c.bytes_received += sum(p.numel() * p.element_size() for p in parts)
            return
        attn = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        self.c.bytes_received += attn.numel() * attn.element_size()
        o = F.linear(attn.reshape(attn.shape[0], m.q_size), lw.o_proj)
        if m.fused:
            from services.engine import fused_ops

            x, b.residual = fused_ops.rms_norm(o, lw.post_norm, cfg.rms_norm_eps, b.residual)
            b.h = F.linear(fused_ops.silu_mul(F.linear(x, lw.gate_up)), lw.down)
            return
        h = b.h + o
        x = rms_norm(h, lw.post_norm, cfg.rms_norm_eps)
        gate, up = F.linear(x, lw.gate_up).chunk(2, dim=-1)
        b.h = h + F.linear(F.silu(gate) * up, lw.down)

    def _logits(self, b: _Batch) -> torch.Tensor:
        m, cfg = self.m, self.m.cfg
        if b.graphs is not None:
            b.graphs.replay(len(m.w.layers))
            assert b.graphs.logits is not None
            return b.graphs.logits[b.mb.logits_rows]
        rows = torch.tensor(b.mb.logits_rows, dtype=torch.long, device=b.h.device)
        h = b.h[rows]
        if m.fused:
            from services.engine import fused_ops

            x, _ = fused_ops.rms_norm(h, m.w.norm, cfg.rms_norm_eps, b.residual[rows])
        else:
            x = rms_norm(h, m.w.norm, cfg.rms_norm_eps)
        return F.linear(x, m.w.lm_head).float()

    def _heads(self, t: torch.Tensor, worker: int, group: int = 1) -> torch.Tensor:
        """Worker `worker`'s heads of q (group = query heads per KV head) or of k, v."""
        a, b = self.shards.heads[worker]
        if len(self.shards.heads) == 1:
            return t
        return t[:, a * group : b * group]

    def _rope_fused(self, qkv: torch.Tensor, positions: torch.Tensor):
        """RoPE in place by the fused kernel, writing no cache (every slot -1)."""
        from services.engine import fused_ops

        m, cfg = self.m, self.m.cfg
        n = qkv.shape[0]
        if self._dummy_cache is None:
            self._dummy_cache = torch.zeros(
                (1, cfg.num_kv_heads, cfg.head_dim), dtype=qkv.dtype, device=qkv.device
            )
        skip = self._skip.get(n)
        if skip is None:
            skip = self._skip[n] = torch.full((n,), -1, dtype=torch.long, device=qkv.device)
        fused_ops.rope_and_cache(
            qkv, positions, m.cos_sin, self._dummy_cache, self._dummy_cache, skip,
            cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
        )  # fmt: skip
        q, k, v = qkv.split((m.q_size, m.kv_size, m.kv_size), dim=-1)
        d = cfg.head_dim
        return q.view(n, -1, d), k.view(n, -1, d), v.view(n, -1, d)


def _nbytes(*ts: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in ts)
