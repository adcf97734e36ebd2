"""DistAttention's arithmetic: attention over KV split into segments (any blocks, any holder),
merged by log-sum-exp, equals attention over one pool."""

from __future__ import annotations

import pytest
import torch

from services.engine.attention import AttentionMetadata, PrefillSeq
from services.engine.attention_cpu import TorchAttentionBackend
from services.engine.partial_attention import SegmentBatch, merge_into, partial_attention

BS = 4


def _reference(q, k_cache, v_cache, tables, lens, nq):
    """The engine's own backend on one pool: decodes (nq == 1) then one prefill chunk."""
    nd = sum(1 for n in nq if n == 1)
    width = max(len(t) for t in tables[:nd]) if nd else 1
    table = torch.zeros((nd, width), dtype=torch.long)
    for i in range(nd):
        table[i, : len(tables[i])] = torch.tensor(tables[i])
    mask = (torch.arange(width * BS)[None, :] < torch.tensor(lens[:nd])[:, None])[:, None, None]
    prefills, row = [], nd
    for t, n, ln in zip(tables[nd:], nq[nd:], lens[nd:], strict=True):
        prefills.append(PrefillSeq(row, n, ln, torch.tensor(t)))
        row += n
    meta = AttentionMetadata(
        nd, torch.zeros(0, dtype=torch.long), table if nd else None, mask if nd else None,
        tuple(prefills), q.shape[-1] ** -0.5, BS,
    )  # fmt: skip
    # slot_mapping is empty: nothing new to write, the caches already hold everything
    out, _ = TorchAttentionBackend().forward(
        q, torch.zeros(0, *k_cache.shape[1:]), torch.zeros(0, *k_cache.shape[1:]),
        k_cache, v_cache, meta,
    )  # fmt: skip
    return out


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("num_segments", [1, 2, 3])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2)], ids=["mha", "gqa"])
def test_split_attention_merges_exactly(num_segments, heads, device):
    """On CUDA the decode rows go through the paged decode kernel's log-sum-exp output."""
    torch.manual_seed(num_segments)
    h, hkv = heads
    d, num_blocks = 16, 64
    k_cache = torch.randn(num_blocks * BS, hkv, d)
    v_cache = torch.randn(num_blocks * BS, hkv, d)
    perm = torch.randperm(num_blocks).tolist()
    lens = [37, 5, 22, 30]  # three decodes, then a prefill chunk of 9 ending at 30
    nq = [1, 1, 1, 9]
    tables, cursor = [], 0
    for ln in lens:
        nb = -(-ln // BS)
        tables.append(perm[cursor : cursor + nb])
        cursor += nb
    q = torch.randn(sum(nq), h, d)
    want = _reference(q, k_cache, v_cache, tables, lens, nq)

    # Split each sequence's blocks round-robin by runs of 2 blocks over num_segments holders.
    out = lse = None
    rows = [0, 1, 2, 3]
    row_of = torch.arange(sum(nq))
    qpos = torch.tensor([36, 4, 21, *range(21, 30)])
    for seg_i in range(num_segments):
        tabs, logs = [], []
        for t in tables:
            pick = [j for j in range(len(t)) if (j // 2) % num_segments == seg_i]
            tabs.append([t[j] for j in pick])
            logs.append(pick)
        width = max(1, *(len(t) for t in tabs))
        table = torch.zeros((4, width), dtype=torch.long)
        logical = torch.full((4, width), -1, dtype=torch.long)
        for i, (t, lg) in enumerate(zip(tabs, logs, strict=True)):
            table[i, : len(t)] = torch.tensor(t, dtype=torch.long)
            logical[i, : len(lg)] = torch.tensor(lg, dtype=torch.long)
        runs = [lg == list(range(lg[0], lg[0] + len(lg))) if lg else True for lg in logs]
        seg = SegmentBatch(rows, nq, qpos, table, logical, [len(t) for t in tabs], runs)
        dev = torch.device(device)
        seg = SegmentBatch(
            seg.row_start, seg.num_rows, seg.q_pos.to(dev), seg.table.to(dev),
            seg.logical.to(dev), seg.num_blocks, seg.contiguous,
        )  # fmt: skip
        o, s = partial_attention(q.to(dev), k_cache.to(dev), v_cache.to(dev), seg, BS, d**-0.5)
        o, s = o.cpu(), s.cpu()
        if out is None:
            out, lse = o, s
        else:
            merge_into(out, lse, row_of, o, s)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-5)


def test_a_segment_with_no_visible_key_weighs_nothing():
    """A holder whose blocks all lie after a query (a prefill chunk's early rows) returns
    lse = -inf for it, and merging it changes nothing."""
    k_cache = torch.randn(8 * BS, 2, 8)
    v_cache = torch.randn(8 * BS, 2, 8)
    q = torch.randn(3, 2, 8)
    seg = SegmentBatch(
        [0], [3], torch.tensor([0, 1, 2]), torch.tensor([[5]]), torch.tensor([[3]]), [1], [True]
    )
    o, s = partial_attention(q, k_cache, v_cache, seg, BS, 8**-0.5)
    assert torch.isinf(s).all() and (s < 0).all()
    assert not o.abs().any()
    base, base_lse = torch.randn(3, 2, 8), torch.randn(3, 2)
    out, lse = base.clone(), base_lse.clone()
    merge_into(out, lse, torch.arange(3), o, s)
    torch.testing.assert_close(out, base)
    torch.testing.assert_close(lse, base_lse)
