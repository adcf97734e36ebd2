"""The model worker's runner in offload mode: no KV here, attention on attention workers.

The scheduler and the runner's request states work as in the colocated engine (block ids,
prefix cache, chunked prefill, preemption); what changes is where the blocks are: every block
id names slots on every attention worker, each holding its range of KV heads.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from services.engine.kv_cache import slot_mapping
from services.engine.model import LlamaModel
from services.engine.offload_forward import OffloadForward
from services.engine.offload_plan import (
    AttentionShards,
    OffloadCounters,
    PrefillChunk,
    StepLayout,
    split_step,
)
from services.engine.runner import sample_step
from services.engine.runner_state import RequestStates
from services.engine.sampler import SampledToken, Sampler
from services.engine.sched_output import SchedulerOutput

log = logging.getLogger(__name__)


class OffloadRunner:
    def __init__(
        self, model: LlamaModel, block_size: int, sampler: Sampler, device: str,
        pingpong: bool = False, q_first: bool = False, graph_sizes: list[int] | None = None,
    ) -> None:  # fmt: skip
        self.model = model
        self.bs = block_size
        self.sampler = sampler
        self.device = device
        self.pingpong = pingpong
        self.q_first = q_first
        self.requests = RequestStates()
        self.counters = OffloadCounters()
        self.shards: AttentionShards | None = None
        self.remote = None  # no DistAttention borrowing in offload mode
        self._forward: OffloadForward | None = None
        self.graph_sizes = graph_sizes

    def attach(self, shards: AttentionShards) -> None:
        self.shards = shards
        self._forward = OffloadForward(self.model, shards, self.counters, self.graph_sizes)

    def run(self, so: SchedulerOutput) -> list[SampledToken | None]:
        if self._forward is None:
            raise RuntimeError("an offload engine steps only once its attention workers attach")
        self.requests.update(so)
        if so.kv_loads:  # a prefill's KV, handed off: it goes where the KV lives
            self.shards.load_blocks(so.kv_loads)
        ids, pos, layout, logits_rows = self.prepare(so)
        batches = split_step(layout, logits_rows, self.pingpong)
        dev = self.device
        logits = self._forward(
            torch.tensor(ids, dtype=torch.long).to(dev), torch.from_numpy(pos).to(dev), batches
        )
        return sample_step(self.sampler, self.requests, so.seqs, logits)

    def prepare(self, so: SchedulerOutput) -> tuple[list[int], np.ndarray, StepLayout, list[int]]:
        """(input ids, positions, the attention workers' layout, logits rows) of one step."""
        bs = self.bs
        ids: list[int] = []
        pos, slots, logits_rows = [], [], []
        for s in so.seqs:
            st = self.requests[s.request_id]
            ids += st.tokens(s.start, s.end)
            pos.append(np.arange(s.start, s.end))
            slots.append(slot_mapping(st.block_ids, s.start, s.end, bs))
            if s.samples:
                logits_rows.append(len(ids) - 1)
        nd = len(so.decodes)
        lens = np.array([s.end for s in so.decodes], dtype=np.int64)
        width = -(-int(lens.max()) // bs) if nd else 1
        table = np.zeros((nd, width), dtype=np.int64)
        for r, s in enumerate(so.decodes):
            b = self.requests[s.request_id].block_ids[: -(-s.end // bs)]
            table[r, : len(b)] = b
        chunks, offset = [], nd
        for s in so.prefills:
            t = None
            if s.start > 0:
                t = np.asarray(self.requests[s.request_id].block_ids[: -(-s.end // bs)])
            chunks.append(PrefillChunk(offset, s.num_new, s.end, t))
            offset += s.num_new
        layout = StepLayout(
            nd, np.concatenate(slots), table, lens, tuple(chunks),
            q_first=self.q_first and not chunks, cached=tuple(so.cached_blocks),
        )  # fmt: skip
        return ids, np.concatenate(pos), layout, logits_rows
