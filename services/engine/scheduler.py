"""Continuous batching with a per-step token budget (Sarathi-Serve's stall-free batching).

Each step: running requests first, oldest first (decodes cost one token, an unfinished prefill
continues with a chunk), then waiting requests are admitted while budget, sequence slots and
blocks last. The scheduler counts tokens, not phases: a request is computed until
num_computed_tokens reaches num_tokens, and a step that computes its last known token samples
a new one. When a running request cannot get a block, the newest running request is preempted
by recompute (its blocks are released; full ones stay in the prefix cache, so it usually
resumes from there).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from services.engine.block_pool import BlockPool
from services.engine.kv_transfer import KVBlock
from services.engine.request import FinishReason, Request, Status


@dataclass(frozen=True)
class ScheduledSeq:
    request: Request
    start: int  # num_computed_tokens before this step
    num_new: int
    # This step computes the request's last token (known or pending), so it yields a new one.
    # Fixed when scheduled: the request's token count moves on before the step's results are read.
    samples: bool = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.samples is None:
            r = self.request
            object.__setattr__(self, "samples", self.end == r.num_tokens + r.num_pending_tokens)

    @property
    def end(self) -> int:
        return self.start + self.num_new


@dataclass
class SchedulerOutput:
    """Everything the runner needs for one step, and nothing more."""

    decodes: list[ScheduledSeq] = field(default_factory=list)  # one new token each
    prefills: list[ScheduledSeq] = field(default_factory=list)
    kv_loads: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (block id, kv)
    preempted: list[str] = field(default_factory=list)

    @property
    def seqs(self) -> list[ScheduledSeq]:
        return self.decodes + self.prefills

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new for s in self.decodes) + sum(s.num_new for s in self.prefills)

    @property
    def is_empty(self) -> bool:
        return not self.decodes and not self.prefills


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def _finishes_on_pending(req: Request) -> bool:
    """The token in flight reaches max_tokens or the context limit, so the request ends there."""
    n_out = req.num_output_tokens + req.num_pending_tokens
    n_all = req.num_tokens + req.num_pending_tokens
    return n_out >= req.params.max_tokens or (req.max_len > 0 and n_all >= req.max_len)


class Scheduler:
    def __init__(
        self, pool: BlockPool, block_size: int, max_num_seqs: int, max_num_batched_tokens: int
    ) -> None:
        self.pool = pool
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if req.num_pending_tokens and _finishes_on_pending(req):
                i += 1  # its in-flight token is its last: nothing more to compute
                continue
            num_new = min(req.num_tokens + req.num_pending_tokens - req.num_computed_tokens, budget)
            need = blocks_for(req.num_computed_tokens + num_new, self.block_size) - len(
                req.block_ids
            )
            while not self.pool.can_allocate(need):
                victim = self.running.pop()  # newest; never one already scheduled this step
                self._preempt(victim)
                out.preempted.append(victim.request_id)
                if victim is req:
                    break
            if req.status != Status.RUNNING:
                break
            req.block_ids += self.pool.allocate(need)
            scheduled.append(ScheduledSeq(req, req.num_computed_tokens, num_new))
            budget -= num_new
            i += 1

        # No admissions in a step that had to preempt: memory is short already.
        while (
            not out.preempted
            and self.waiting
            and budget > 0
            and len(self.running) < self.max_num_seqs
        ):
            req = self.waiting[0]
            if req.num_pending_tokens:  # preempted with a token in flight: admit once it lands
                break
            admitted = self._admit(req, budget, out)
            if admitted is None:
                break
            self.waiting.popleft()
            req.status = Status.RUNNING
            self.running.append(req)
            scheduled.append(admitted)
            budget -= admitted.num_new

        for s in scheduled:
            (out.decodes if s.num_new == 1 else out.prefills).append(s)
        return out

    def _admit(self, req: Request, budget: int, out: SchedulerOutput) -> ScheduledSeq | None:
        """Find the KV the request need not compute (prefix cache, then imported blocks) and
        allocate blocks for its first chunk. Returns None, changing nothing, if blocks lack."""
        bs = self.block_size
        limit = req.num_tokens - 1  # at least one token must be computed to get logits
        hits = self.pool.lookup(req.block_hashes[: limit // bs])
        computed = len(hits) * bs
        loads: list[tuple[int, KVBlock]] = []  # (block position, block)
        for pos in range(len(hits), len(req.imported_kv)):
            blk = req.imported_kv[pos]
            start = pos * bs
            if (
                blk is None
                or start + blk.num_tokens > limit
                or list(blk.token_ids) != req.all_token_ids[start : start + blk.num_tokens]
            ):
                break
            loads.append((pos, blk))
            computed = start + blk.num_tokens
            if blk.num_tokens < bs:
                break
        num_new = min(req.num_tokens - computed, budget)
        need = blocks_for(computed + num_new, bs) - len(hits)
        reclaimed = sum(1 for b in hits if self.pool.blocks[b].ref_cnt == 0)
        if need + reclaimed > self.pool.num_free:
            return None
        self.pool.acquire(hits)
        req.block_ids = hits + self.pool.allocate(need)
        out.kv_loads.extend((req.block_ids[pos], blk.kv) for pos, blk in loads)
        for pos, blk in loads:  # imported full blocks join the prefix cache like computed ones
            if blk.num_tokens == bs:
                self.pool.cache(req.block_ids[pos], req.block_hashes[pos])
        if req.num_preemptions == 0:
            req.num_cached_tokens = len(hits) * bs
            req.num_imported_tokens = computed - len(hits) * bs
        req.imported_kv = []
        req.num_computed_tokens = computed
        if req.scheduled_time is None:
            req.scheduled_time = time.monotonic()
        return ScheduledSeq(req, computed, num_new)

    def _preempt(self, req: Request) -> None:
        self._release(req)
        req.num_computed_tokens = 0
        req.status = Status.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _release(self, req: Request) -> None:
        self.pool.release(list(reversed(req.block_ids)))  # tail first: prefix evicted last
        req.block_ids = []

    def commit(self, seq: ScheduledSeq) -> None:
        """The step computed seq's tokens: advance and cache the blocks that became full."""
        req = seq.request
        req.num_computed_tokens = seq.end
        bs = self.block_size
        # A block whose last token is still pending has no hash yet; cache_hashed takes it.
        for j in range(seq.start // bs, min(seq.end // bs, len(req.block_hashes))):
            self.pool.cache(req.block_ids[j], req.block_hashes[j])

    def cache_hashed(self, req: Request, num_hashes_before: int) -> None:
        """Cache computed blocks that got their hash only now, when a token sampled by an
        earlier, already committed step was appended."""
        stop = min(len(req.block_hashes), req.num_computed_tokens // self.block_size)
        for j in range(num_hashes_before, stop):
            self.pool.cache(req.block_ids[j], req.block_hashes[j])

    def finish(self, req: Request, reason: FinishReason) -> None:
        """End a request anywhere in its life and release its blocks. Read any KV to export
        before calling this."""
        if req.status == Status.FINISHED:
            return
        if req.status == Status.RUNNING:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        self._release(req)
        req.status = Status.FINISHED
        req.finish_reason = reason
