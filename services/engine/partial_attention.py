"""Attention of queries over one segment of their sequences' KV, with its log-sum-exp.

DistAttention splits a sequence's KV into segments held by different pools (the decoder's own,
attention replicas'); each pool attends its queries over the keys it holds and returns the
partial output and per-head log-sum-exp in float32, which `merge_into` combines exactly.

A segment is a list of blocks with their logical positions in the sequence, so a key's position
is logical block * block_size + offset; a query at position p sees the keys at positions <= p.
Slots past the sequence's last written token are never seen: every query sits at or after the
last token written so far. A query that sees no key gets lse = -inf and output 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from services.engine.attention import gather_blocks


@dataclass(frozen=True)
class SegmentBatch:
    """Queries and the KV segment each sequence attends over.

    Rows of one sequence are contiguous in q. For sequence s: rows [row_start[s], row_start[s] +
    num_rows[s]), its blocks table[s, :num_blocks[s]] at logical block indices
    logical[s, :num_blocks[s]]; q_pos[r] is row r's position in its sequence."""

    row_start: list[int]
    num_rows: list[int]
    q_pos: torch.Tensor  # [N] int64
    table: torch.Tensor  # [B, W] int64 block ids (padding: 0)
    logical: torch.Tensor  # [B, W] int64 logical block index (padding: -1)
    num_blocks: list[int]
    # Per sequence: its blocks are one run of consecutive logical blocks (known on the host
    # when the batch is built, so no layer has to read it back from the device).
    contiguous: list[bool]
    # Index tensors derived from the above, made on the first layer and reused by the others
    # (building one from a host list waits for the device).
    derived: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def build(
        cls, seqs: list[tuple[int, int, list[int], list[int]]], device: str | torch.device
    ) -> SegmentBatch:
        """From each sequence's (first query position, number of queries, its blocks, their
        logical indices in increasing order), rows laid out sequence after sequence."""
        width = max([1, *(len(t) for _, _, t, _ in seqs)])
        table = np.zeros((len(seqs), width), dtype=np.int64)
        logical = np.full((len(seqs), width), -1, dtype=np.int64)
        row_start, num_rows, q_pos, row = [], [], [], 0
        for i, (q0, nq, blocks, order) in enumerate(seqs):
            table[i, : len(blocks)] = blocks
            logical[i, : len(order)] = order
            row_start.append(row)
            num_rows.append(nq)
            q_pos.append(np.arange(q0, q0 + nq))
            row += nq
        dev = torch.device(device)

        def on_device(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(a).to(dev, non_blocking=True)

        return cls(
            row_start, num_rows,
            on_device(np.concatenate(q_pos) if q_pos else np.zeros(0, dtype=np.int64)),
            on_device(table), on_device(logical), [len(t) for _, _, t, _ in seqs],
            [not o or o[-1] - o[0] == len(o) - 1 for _, _, _, o in seqs],  # sorted, unique
        )  # fmt: skip

    def cached(self, key: str, make):
        t = self.derived.get(key)
        if t is None:
            t = self.derived[key] = make()
        return t


def partial_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seg: SegmentBatch,
    block_size: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [N, H, D]; caches: [slots, Hkv, D]. Returns out [N, H, D] and lse [N, H], float32.

    Single-row sequences (decodes) are attended in one batched call; each multi-row sequence
    (a prefill chunk) on its own, so no batch pads to the longest chunk."""
    n, h, d = q.shape
    dev = q.device
    out = torch.zeros((n, h, d), dtype=torch.float32, device=q.device)
    lse = torch.full((n, h), float("-inf"), dtype=torch.float32, device=q.device)
    singles = [s for s, r in enumerate(seg.num_rows) if r == 1 and seg.num_blocks[s] > 0]
    if singles and q.is_cuda:
        singles = _decode_on_gpu(q, k_cache, v_cache, seg, singles, block_size, scale, out, lse)
    if singles:
        rows = seg.cached(
            "single_rows", lambda: torch.tensor([seg.row_start[s] for s in singles], device=dev)
        )
        o, s_ = _attend_seqs(
            q, k_cache, v_cache, seg, singles, rows.unsqueeze(1), block_size, scale
        )
        out[rows], lse[rows] = o[:, 0], s_[:, 0]
    for s, r in enumerate(seg.num_rows):
        if r <= 1 or seg.num_blocks[s] == 0:
            continue
        rows = torch.arange(seg.row_start[s], seg.row_start[s] + r, device=q.device)
        o, s_ = _attend_seqs(q, k_cache, v_cache, seg, [s], rows.unsqueeze(0), block_size, scale)
        out[rows], lse[rows] = o[0], s_[0]
    return out, lse


def _decode_on_gpu(q, k_cache, v_cache, seg, singles, bs, scale, out, lse) -> list[int]:
    """Single-query sequences whose blocks are one run of logical blocks go to the paged decode
    kernel (the key at logical run start is the context's first); returns those left over."""
    from services.engine.attention_cuda import paged_decode_attention
    from services.engine.fused_ops import HAS_TRITON

    if not HAS_TRITON:
        return singles
    runs = [s for s in singles if seg.contiguous[s]]
    rest = [s for s in singles if not seg.contiguous[s]]
    if runs:

        def make():
            idx = torch.tensor(runs, device=q.device)
            rows = torch.tensor([seg.row_start[s] for s in runs], device=q.device)
            first = seg.logical[idx, 0] * bs
            nkeys = torch.tensor([seg.num_blocks[s] for s in runs], device=q.device) * bs
            lens = torch.minimum(seg.q_pos[rows] - first + 1, nkeys).clamp(min=0)
            return rows, lens.to(torch.int32), seg.table[idx].to(torch.int32)

        rows, lens, table = seg.cached("decode_runs", make)
        o = torch.empty((len(runs), *q.shape[1:]), dtype=q.dtype, device=q.device)
        s_ = torch.empty((len(runs), q.shape[1]), dtype=torch.float32, device=q.device)
        paged_decode_attention(q[rows], k_cache, v_cache, table, lens, bs, scale, out=o, lse=s_)
        out[rows], lse[rows] = o.float(), s_
    return rest


def _attend_seqs(q, k_cache, v_cache, seg: SegmentBatch, seqs: list[int], rows, bs, scale):
    """Sequences `seqs`, each with the same number of rows: rows [B, T] index q.
    Returns out [B, T, H, D] and lse [B, T, H]."""
    width = max(seg.num_blocks[s] for s in seqs)
    idx = seg.cached(f"seqs{seqs}", lambda: torch.tensor(seqs, device=q.device))
    table = seg.table[idx, :width]  # [B, W]
    logical = seg.logical[idx, :width]
    kc = gather_blocks(k_cache, table, bs)  # [B, W*bs, Hkv, D]
    vc = gather_blocks(v_cache, table, bs)
    offs = torch.arange(bs, device=q.device)
    kpos = (logical.unsqueeze(-1) * bs + offs).flatten(1)  # [B, S]
    kpos = kpos.masked_fill((logical < 0).repeat_interleave(bs, dim=1), 1 << 62)
    qb = q[rows]  # [B, T, H, D]
    b, t, h, d = qb.shape
    hkv = kc.shape[2]
    g = h // hkv
    # Group query heads by their KV head: [B, Hkv, G*T, D], so K/V are never repeated.
    qg = qb.permute(0, 2, 1, 3).reshape(b, hkv, g * t, d).float()
    scores = torch.matmul(qg, kc.permute(0, 2, 3, 1).float()) * scale  # [B, Hkv, G*T, S]
    qpos = seg.q_pos[rows].repeat(1, g)  # [B, G*T], ordered like qg's rows
    visible = kpos.unsqueeze(1) <= qpos.unsqueeze(-1)  # [B, G*T, S]
    scores = scores.masked_fill(~visible.unsqueeze(1), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, Hkv, G*T]
    probs = torch.exp(scores - lse.unsqueeze(-1)).nan_to_num(0.0)
    o = torch.matmul(probs, vc.permute(0, 2, 1, 3).float())  # [B, Hkv, G*T, D]
    o = o.reshape(b, h, t, d).permute(0, 2, 1, 3)  # [B, T, H, D]
    lse = lse.reshape(b, h, t).permute(0, 2, 1)  # [B, T, H]
    return o, lse


def merge_into(
    out: torch.Tensor,
    lse: torch.Tensor,
    rows: torch.Tensor,
    part: torch.Tensor,
    part_lse: torch.Tensor,
) -> None:
    """Fold a partial over rows `rows` into the running (out, lse), both float32, in place:
    the log-sum-exp identity, so the order of folding does not change the result beyond
    rounding. A side with lse = -inf weighs 0."""
    out[rows], lse[rows] = merge_full(out[rows], lse[rows], part, part_lse)


def merge_full(
    out: torch.Tensor, lse: torch.Tensor, part: torch.Tensor, part_lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two partials over the same rows, merged: (out, lse), float32. A side with lse = -inf
    weighs 0 (both: out 0)."""
    total = torch.logaddexp(lse, part_lse)
    w_cur = torch.exp(lse - total).nan_to_num(0.0).unsqueeze(-1)
    w_part = torch.exp(part_lse - total).nan_to_num(0.0).unsqueeze(-1)
    return out * w_cur + part.float() * w_part, total
