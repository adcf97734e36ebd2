"""Turns a SchedulerOutput into tensors, runs the model, samples.

The runner knows requests only through SchedulerOutputs: it keeps its own RequestStates (tokens,
block tables, sampling parameters), appends the tokens it samples, and returns one sampled token
(or None) per scheduled sequence, in SchedulerOutput.seqs order.
"""

from __future__ import annotations

import numpy as np
import torch

from services.engine.attention import AttentionMetadata, PrefillSeq
from services.engine.dist_attention import placements, plan_step
from services.engine.kv_cache import KVCache, slot_mapping
from services.engine.model import LlamaModel
from services.engine.runner_state import RequestStates
from services.engine.sampler import SampledToken, Sampler
from services.engine.sched_output import ScheduledSeq, SchedulerOutput


def sample_step(
    sampler: Sampler, requests: RequestStates, seqs: list[ScheduledSeq], logits: torch.Tensor
) -> list[SampledToken | None]:
    """Sample the step's sampling rows (logits in that order), append each token to its
    request's output; one token or None per scheduled sequence."""
    states = [requests[s.request_id] for s in seqs if s.samples]
    sampled = sampler(logits, [st.sampling_row() for st in states]) if states else []
    for st, tok in zip(states, sampled, strict=True):
        st.output_token_ids.append(tok.token_id)
    tokens = iter(sampled)
    return [next(tokens) if s.samples else None for s in seqs]


class ModelRunner:
    def __init__(
        self, model: LlamaModel, kv_cache: KVCache, sampler: Sampler, device: str,
        lone_threads: int = 0,
    ) -> None:  # fmt: skip
        self.model = model
        # CPU: a step of one row runs on lone_threads, the others on the threads the process
        # had when the runner was made (0: every step on those).
        self.threads = (lone_threads, torch.get_num_threads()) if lone_threads else None
        self.kv_cache = kv_cache
        self.sampler = sampler
        self.device = device
        self.bs = kv_cache.block_size
        self.scale = model.cfg.head_dim**-0.5
        self.requests = RequestStates()
        self.remote = None  # a RemoteKV once the engine borrows memory (DistAttention)

    def run(self, so: SchedulerOutput) -> list[SampledToken | None]:
        self.requests.update(so)
        for block_id, kv in so.kv_loads:
            self.kv_cache.write_block(block_id, kv.to(self.kv_cache.data.device))
        seqs = so.seqs
        input_ids, positions, meta, logits_rows = self.prepare(so)
        if self.threads is not None:
            lone, full = self.threads
            want = lone if input_ids.numel() == 1 else full
            if torch.get_num_threads() != want:
                torch.set_num_threads(want)
        logits = self.model.forward(input_ids, positions, meta, self.kv_cache, logits_rows)
        return sample_step(self.sampler, self.requests, seqs, logits)

    def prepare(
        self, so: SchedulerOutput
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        """Device tensors of one step: (input ids, positions, metadata, logits rows), for
        requests already in self.requests (run() first applies the step's news there)."""
        bs = self.bs
        ids: list[int] = []
        pos: list[np.ndarray] = []
        slot_parts: list[np.ndarray] = []
        logits_rows: list[int] = []
        for s in so.seqs:
            st = self.requests[s.request_id]
            ids += st.tokens(s.start, s.end)
            pos.append(np.arange(s.start, s.end))
            if not st.remote:
                slot_parts.append(slot_mapping(st.block_ids, s.start, s.end, bs))
            if s.samples:
                logits_rows.append(len(ids) - 1)

        if self.remote is not None and any(self.requests[s.request_id].remote for s in so.seqs):
            return self._prepare_dist(so, ids, pos, logits_rows)
        decode_table = decode_mask = decode_lens = None
        if so.decodes:
            decode_table, decode_mask, decode_lens = self._decode_context(so.decodes)
        prefills = []
        offset = len(so.decodes)
        for s in so.prefills:
            table = None
            if s.start > 0:
                blocks = self.requests[s.request_id].block_ids[: -(-s.end // bs)]
                table = torch.tensor(blocks, dtype=torch.long)
            prefills.append(PrefillSeq(offset, s.num_new, s.end, self._dev(table)))
            offset += s.num_new

        meta = AttentionMetadata(
            num_decode=len(so.decodes),
            slot_mapping=self._dev(torch.from_numpy(np.concatenate(slot_parts))),
            decode_block_table=decode_table,
            decode_mask=decode_mask,
            prefills=tuple(prefills),
            scale=self.scale,
            block_size=bs,
            decode_context_lens=decode_lens,
        )
        return (
            self._dev(torch.tensor(ids, dtype=torch.long)),
            self._dev(torch.from_numpy(np.concatenate(pos))),
            meta,
            self._dev(torch.tensor(logits_rows, dtype=torch.long)),
        )

    def _prepare_dist(self, so: SchedulerOutput, ids, pos, logits_rows):
        """A step with remote KV: every sequence attends through DistAttention."""
        slots, dist = plan_step(
            placements(so, self.requests), self.remote, self.bs, self.scale, self.device
        )
        meta = AttentionMetadata(
            num_decode=len(so.decodes),
            slot_mapping=self._dev(torch.from_numpy(slots)),
            decode_block_table=None,
            decode_mask=None,
            prefills=(),
            scale=self.scale,
            block_size=self.bs,
            dist=dist,
        )
        return (
            self._dev(torch.tensor(ids, dtype=torch.long)),
            self._dev(torch.from_numpy(np.concatenate(pos))),
            meta,
            self._dev(torch.tensor(logits_rows, dtype=torch.long)),
        )

    def _decode_context(
        self, decodes: list[ScheduledSeq]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Block table of every decode sequence's context, padded to the longest: [B, nblk],
        the mask of real slots: [B, 1, 1, nblk * bs], and the context lengths: int64 [B]."""
        lens = np.array([s.end for s in decodes], dtype=np.int64)
        nblk = -(-int(lens.max()) // self.bs)
        table = np.zeros((len(decodes), nblk), dtype=np.int64)
        for r, s in enumerate(decodes):
            b = self.requests[s.request_id].block_ids[: -(-s.end // self.bs)]
            table[r, : len(b)] = b
        valid = np.arange(nblk * self.bs)[None, :] < lens[:, None]
        mask = torch.from_numpy(valid)[:, None, None, :]
        return (
            self._dev(torch.from_numpy(table)),
            self._dev(mask),
            self._dev(torch.from_numpy(lens)),
        )

    def _dev(self, t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None or self.device == "cpu":
            return t
        return t.to(self.device, non_blocking=True)
