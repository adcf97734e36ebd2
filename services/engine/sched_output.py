"""What one step runs: the scheduler's output, and the only thing a runner gets.

A runner never sees the scheduler's requests. It keeps its own state per request (token ids,
block table, sampling parameters) and builds it from these messages alone:

- a request reaches it once in full, as NewRequestData, when it is scheduled for the first
  time or again after a preemption;
- from then on a step names it by id with only what changed (ScheduledSeq: the blocks appended
  to its table and the slice of tokens to compute);
- the runner appends the tokens it samples to its own copy of the request's output, so a
  decode's input token is already known to it;
- it forgets a request named in finished_ids (finished or aborted) or preempted_ids.

A runner applies a step in this order: forget finished_ids and preempted_ids, add
new_requests (an id may leave and come back in the same step), extend the block tables by each
seq's new_block_ids, write kv_loads, then compute decodes and prefills, in that order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from services.engine.remote_kv import RemoteSegment
from services.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class NewRequestData:
    """A request the runner does not know yet: everything it keeps about it.

    Its tokens are all known (a request is never admitted with a token in flight). The runner
    may keep these lists; the scheduler holds no reference to them."""

    request_id: str
    prompt_token_ids: list[int]
    # Generated before this admission: by another engine (P/D hand-off) or before a preemption.
    output_token_ids: list[int]
    params: SamplingParams
    block_ids: list[int]  # its block table, covering this step's slice
    num_computed_tokens: int  # tokens whose KV is in the cache already (prefix hits, imports)
    # Blocks after the local ones, lent by other holders (DistAttention); in sequence order.
    remote: list[RemoteSegment] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ScheduledSeq:
    """One request's slice of the step: compute tokens [start, start + num_new).

    A token of the slice that the runner does not know is one it sampled itself in the previous
    step and has not read back yet (async scheduling on CUDA; at most one per request)."""

    request_id: str
    start: int  # num_computed_tokens before this step
    num_new: int
    # Appended to the request's block table before this step runs; a new request's seq has
    # none (its NewRequestData carries the whole table).
    new_block_ids: list[int]
    # The slice ends at the request's last token (known or in flight), so the step samples a
    # new one. Fixed when scheduled: the request's token count moves on before results are read.
    samples: bool
    # Remote segments appended after the request's blocks (it borrowed for this step).
    new_remote: tuple[RemoteSegment, ...] = ()

    @property
    def end(self) -> int:
        return self.start + self.num_new


@dataclass
class SchedulerOutput:
    """One step: which requests compute which tokens, and what the runner must learn first.

    A step with nothing to compute (is_empty) does not reach the runner, so it carries no ids:
    the scheduler holds finished and preempted ids back for the next step that computes."""

    decodes: list[ScheduledSeq] = field(default_factory=list)  # one token each, first in the batch
    prefills: list[ScheduledSeq] = field(default_factory=list)
    new_requests: list[NewRequestData] = field(default_factory=list)  # seqs among the above
    finished_ids: list[str] = field(default_factory=list)  # finished or aborted since last told
    preempted_ids: list[str] = field(default_factory=list)  # back to waiting, blocks released
    # Imported KV of new requests, written before the step: (block id, [L, 2, T, Hkv, D]).
    kv_loads: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    # Blocks whose full content got a hash since the last step, (block id, hash), when the pool
    # logs them (attention offload records them beside the KV, for a replacement model worker).
    cached_blocks: list[tuple[int, bytes]] = field(default_factory=list)

    @property
    def seqs(self) -> list[ScheduledSeq]:
        """Every seq in batch order; a runner returns one result per seq, in this order."""
        return self.decodes + self.prefills

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new for s in self.decodes) + sum(s.num_new for s in self.prefills)

    @property
    def is_empty(self) -> bool:
        return not self.decodes and not self.prefills
