"""DistAttention on the decoder: a step whose sequences hold KV outside the local pool.

A sequence's KV is its local blocks (a prefix) followed by remote segments on other holders.
Per layer the decoder sends each holder the queries of the sequences it holds blocks for and
the new K/V that belong there, computes its own partial over the local blocks meanwhile, then
folds the holders' partials in by log-sum-exp (float32): the same attention, exactly, as if the
whole context were local.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from services.engine.partial_attention import SegmentBatch, merge_into, partial_attention
from services.engine.remote_kv import RemoteKV, RemoteSegment, SeqSlice
from services.engine.runner_state import RequestStates
from services.engine.sched_output import SchedulerOutput


@dataclass(frozen=True)
class SeqPlacement:
    """One scheduled sequence as the runner knows it: its rows in the flat batch compute
    positions [start, end); its blocks are `local` then `remote`."""

    seq_id: str
    row_start: int
    start: int
    end: int
    local: list[int]
    remote: list[RemoteSegment]


@dataclass(frozen=True)
class HolderPart:
    holder_id: str
    rows: torch.Tensor  # q rows (flat batch) of its sequences, in slice order
    write_rows: torch.Tensor  # rows whose new K/V it stores


@dataclass
class DistStep:
    local: SegmentBatch  # every sequence's local blocks
    local_rows: torch.Tensor  # rows whose K/V is written to the local cache
    local_slots: torch.Tensor
    parts: list[HolderPart]
    kv: RemoteKV
    block_size: int
    scale: float

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        written: bool = False,
    ) -> torch.Tensor:
        """Attention of layer `layer` for the whole batch: [N, H, D] in q's dtype. written:
        the local rows' K/V are in the cache already (the fused path writes them with RoPE)."""
        if not written and self.local_rows.numel():
            k_cache.index_copy_(0, self.local_slots, k[self.local_rows])
            v_cache.index_copy_(0, self.local_slots, v[self.local_rows])
        # Send first, so the holders work while the local partial is computed.
        pending = [
            self.kv.send_layer(p.holder_id, layer, q[p.rows], k[p.write_rows], v[p.write_rows])
            for p in self.parts
        ]
        out, lse = partial_attention(q, k_cache, v_cache, self.local, self.block_size, self.scale)
        for p, res in zip(self.parts, pending, strict=True):
            part, part_lse = res.result()
            merge_into(out, lse, p.rows, part.to(out.device), part_lse.to(out.device))
        return out.to(q.dtype)


def placements(so: SchedulerOutput, states: RequestStates) -> list[SeqPlacement]:
    """Each scheduled sequence's rows and blocks, from the runner's copy of its request."""
    out, row = [], 0
    for s in so.seqs:
        st = states[s.request_id]
        out.append(SeqPlacement(s.request_id, row, s.start, s.end, st.block_ids, st.remote))
        row += s.num_new
    return out


@dataclass
class HostPlan:
    """A step's plan on the host: local cache slot per row (-1: the K/V goes to a holder), each
    sequence's local segment, and per holder its slices, q rows and k/v rows."""

    slots: np.ndarray
    local_segments: list[tuple[int, int, list[int], list[int]]]
    by_holder: dict[str, tuple[list[SeqSlice], list[int], list[int]]]


def plan_host(seqs: list[SeqPlacement], block_size: int) -> HostPlan:
    bs = block_size
    n = seqs[-1].row_start + (seqs[-1].end - seqs[-1].start) if seqs else 0
    slots = np.full(n, -1, dtype=np.int64)
    local_segments = []
    by_holder: dict[str, tuple[list[SeqSlice], list[int], list[int]]] = {}
    for s in seqs:
        num = s.end - s.start
        seen = s.local[: -(-s.end // bs)]  # local blocks: a prefix, one run
        local_segments.append((s.start, num, seen, list(range(len(seen)))))
        local_end = min(s.end, len(s.local) * bs)
        if local_end > s.start:
            p = np.arange(s.start, local_end)
            local = np.asarray(s.local, dtype=np.int64)
            slots[s.row_start : s.row_start + len(p)] = local[p // bs] * bs + p % bs
        for holder, blocks in _blocks_by_holder(s.remote).items():
            if blocks[0] * bs > s.end - 1:
                continue  # nothing visible or written there yet
            pos = np.arange(s.start, s.end)
            mine = np.isin(pos // bs, blocks)
            written = pos[mine]
            if len(written) and written[-1] - written[0] + 1 != len(written):
                raise AssertionError(f"{s.seq_id}: a step's writes on {holder} are not contiguous")
            w0 = int(written[0]) if len(written) else s.start
            slices, qrows, wrows = by_holder.setdefault(holder, ([], [], []))
            slices.append(SeqSlice(s.seq_id, s.start, num, w0, len(written)))
            qrows.extend(range(s.row_start, s.row_start + num))
            wrows.extend(int(s.row_start + (p - s.start)) for p in written)
    return HostPlan(slots, local_segments, by_holder)


def plan_step(
    seqs: list[SeqPlacement], kv: RemoteKV, block_size: int, scale: float, device: str
) -> tuple[np.ndarray, DistStep]:
    """The step's local cache slots (-1 for a token whose K/V goes to a holder) and its
    DistStep; tells each holder its slices (RemoteKV.begin_step)."""
    plan = plan_host(seqs, block_size)
    dev = torch.device(device)

    def tensor(a) -> torch.Tensor:
        return torch.as_tensor(np.asarray(a, dtype=np.int64)).to(dev, non_blocking=True)

    slots = plan.slots
    local_rows = np.flatnonzero(slots >= 0)
    parts = []
    for holder, (slices, qrows, wrows) in plan.by_holder.items():
        kv.begin_step(holder, slices)
        parts.append(HolderPart(holder, tensor(qrows), tensor(wrows)))
    local = SegmentBatch.build(plan.local_segments, dev)
    step = DistStep(
        local, tensor(local_rows), tensor(slots[local_rows]), parts, kv, block_size, scale
    )  # fmt: skip
    return slots, step


def _blocks_by_holder(remote: list[RemoteSegment]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for seg in remote:
        out.setdefault(seg.holder_id, []).extend(range(seg.first_block, seg.end_block))
    return out
