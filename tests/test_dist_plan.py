"""A split decode step's host-side plan: which rows write where, and what each holder read in
place sees (services/engine/dist_graphs.pool_inputs), checked against positions worked out by
hand. The GPU graphs that consume these run in the CUDA tests of test_distattention.py."""

from __future__ import annotations

import numpy as np

from services.engine.dist_attention import SeqPlacement, plan_host
from services.engine.dist_graphs import pool_inputs
from services.engine.remote_kv import RemoteSegment

BS = 4


def _seq(sid, row, pos, local, remote):
    return SeqPlacement(sid, row, pos, pos + 1, local, remote)


def test_in_place_inputs_follow_each_sequence_s_blocks_on_the_holder():
    seqs = [
        # blocks 0-1 local, 2-3 on h (pool blocks 7, 9): position 13 is block 3, offset 1
        _seq("a", 0, 13, [5, 6], [RemoteSegment("h", 2, 2, (7, 9))]),
        # all local so far: h holds nothing of it
        _seq("b", 1, 5, [1, 2], []),
        # block 1 on h, block 2 on g; position 9 is in g's block: h's keys are all seen
        _seq("c", 2, 9, [3], [RemoteSegment("h", 1, 1, (4,)), RemoteSegment("g", 2, 1, (0,))]),
    ]
    h = pool_inputs(seqs, "h", BS, max_blocks=8)
    assert h.write_rows.tolist() == [0]
    assert h.write_slots.tolist() == [9 * BS + 1]
    assert h.table[0, :2].tolist() == [7, 9] and h.lens[0] == 13 - 2 * BS + 1
    assert h.lens[1] == 0  # nothing of b there
    assert h.table[2, 0] == 4 and h.lens[2] == BS  # c's block 1, whole
    g = pool_inputs(seqs, "g", BS, max_blocks=8)
    assert g.write_rows.tolist() == [2] and g.write_slots.tolist() == [0 * BS + 1]
    assert g.lens.tolist() == [0, 0, 9 - 2 * BS + 1]
    plan = plan_host(seqs, BS)
    assert plan.slots.tolist() == [-1, 2 * BS + 1, -1]  # only b's token stays local
    assert set(plan.by_holder) == {"h", "g"}


def test_in_place_refuses_what_the_decode_kernel_cannot_read():
    gap = [
        _seq("a", 0, 20, [1], [RemoteSegment("h", 1, 1, (3,)), RemoteSegment("h", 3, 2, (4, 5))])
    ]
    assert pool_inputs(gap, "h", BS, max_blocks=8) is None  # not one run of logical blocks
    untold = [_seq("a", 0, 9, [1], [RemoteSegment("h", 1, 2)])]
    assert pool_inputs(untold, "h", BS, max_blocks=8) is None  # pool blocks not known
    wide = [_seq("a", 0, 40, [1], [RemoteSegment("h", 1, 10, tuple(range(10)))])]
    assert pool_inputs(wide, "h", BS, max_blocks=4) is None  # wider than the graphs' table


def test_a_holder_whose_blocks_come_later_sees_nothing_yet():
    seqs = [_seq("a", 0, 6, [1, 2], [RemoteSegment("h", 2, 2, (8, 9))])]
    h = pool_inputs(seqs, "h", BS, max_blocks=8)
    assert h.lens.tolist() == [0] and h.write_rows.size == 0
    assert np.all(h.table == 0)
