"""Continuous batching with a per-step token budget (Sarathi-Serve's stall-free batching).

Each step: running requests first, in admission order (decodes cost one token, an unfinished
prefill continues with a chunk), then waiting requests are admitted, in the policy's order,
while budget, sequence slots and blocks last. The scheduler counts tokens, not phases: a
request is computed until num_computed_tokens reaches num_tokens, and a step that computes its
last known token samples a new one. When a running request cannot get a block, the policy names
a running request to preempt by recompute (its blocks are released; full ones stay in the prefix
cache, so it usually resumes from there) and puts it back in the waiting queue.

With a SwapSpace (preemption_mode swap or fastswitch), a preempted request's KV goes to host
blocks instead, and comes back when it is admitted again (services/engine/swap_space.py); when
the host has no room it is recomputed. Asynchronous swaps (fastswitch) hold the swapped-out
blocks until their copy is done, and a swapped-in request joins the batch only once its copy is.

With a RemoteKV (memory lending, DistAttention), a request that cannot get local blocks first
borrows them from a creditor; only when no creditor can lend does the policy preempt. A
request's local blocks stay a prefix of its sequence: once it has borrowed, its later blocks
are borrowed too.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from services.engine.block_pool import BlockPool
from services.engine.kv_tier import KVTier
from services.engine.kv_transfer import KVBlock
from services.engine.remote_kv import RemoteKV, RemoteSegment
from services.engine.request import FinishReason, Request, Status
from services.engine.sched_output import ScheduledSeq, SchedulerOutput
from services.engine.sched_policy import FCFSPolicy, SchedulingPolicy
from services.engine.sched_swap import (
    SWAPPING_IN,
    SwapScheduling,
    announce,
    blocks_for,
    scheduled_seq,
)
from services.engine.sched_tier import TierScheduling
from services.engine.swap_space import SwapSpace


def _finishes_on_pending(req: Request) -> bool:
    """The token in flight reaches max_tokens or the context limit, so the request ends there."""
    n_out = req.num_output_tokens + req.num_pending_tokens
    n_all = req.num_tokens + req.num_pending_tokens
    return n_out >= req.params.max_tokens or (req.max_len > 0 and n_all >= req.max_len)


class Scheduler(SwapScheduling, TierScheduling):
    def __init__(
        self,
        pool: BlockPool,
        block_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        policy: SchedulingPolicy | None = None,
        remote: RemoteKV | None = None,
        swap: SwapSpace | None = None,
        tier: KVTier | None = None,
    ) -> None:
        self.pool = pool
        self.remote = remote
        self._init_swaps(swap)
        self._init_tier(tier)
        # Told how many blocks are lacking when a running request must preempt or a waiting one
        # can't be admitted: a pool that lends (services.lender) asks its borrowers for blocks
        # back.
        self.on_short: Callable[[int], None] | None = None
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        # Holds the waiting requests. (An empty policy is falsy: it has a length.)
        self.policy: SchedulingPolicy = FCFSPolicy() if policy is None else policy
        self.running: list[Request] = []  # in admission order
        self.num_preemptions = 0
        self.tokens_scheduled = 0  # every step's tokens, for the step metrics
        # Requests that left the running batch since the runner was last told (see
        # SchedulerOutput: only a step that computes something reaches it).
        self._finished_ids: list[str] = []
        self._preempted_ids: list[str] = []
        # Requests ended by the scheduler because they can never fit, with why (the engine
        # reports them as errors).
        self.failed: list[tuple[Request, str]] = []

    @property
    def num_waiting(self) -> int:
        return len(self.policy)

    @property
    def num_unfinished(self) -> int:
        return len(self.policy) + len(self.running) + len(self.swapping_in) + len(self.fetching)

    def set_priority(self, req: Request, priority: int) -> None:
        """Change a request's priority; a waiting one moves to its new place in the queue."""
        reorder = getattr(self.policy, "reorder", None)
        waiting = (
            req.status == Status.WAITING
            and all(r is not req for r, _ in self.swapping_in)
            and req.request_id not in self.fetching
        )
        req.priority = priority
        if waiting and reorder is not None:
            reorder(req)

    def add(self, req: Request) -> None:
        self.policy.add(req)

    def ids_to_drop(self) -> set[str]:
        """Requests that left the running batch and the runner is yet to hear of."""
        return {*self._finished_ids, *self._preempted_ids}

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        if self.swap is not None:
            self._reap_swaps()
        if self.fetching:
            self._reap_fetches()
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preempted: list[str] = []

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if req.num_pending_tokens and _finishes_on_pending(req):
                i += 1  # its in-flight token is its last: nothing more to compute
                continue
            num_new = min(req.num_tokens + req.num_pending_tokens - req.num_computed_tokens, budget)
            need = blocks_for(req.num_computed_tokens + num_new, self.block_size) - req.num_blocks
            grown = self._grow(req, need)
            while grown is None and not self._landing(need):
                victim = self.policy.victim(self.running)
                j = self.running.index(victim)
                del self.running[j]
                if j < i:  # served earlier in this step: it gives its slice back
                    i -= 1
                    budget += _unschedule(scheduled, victim.request_id)
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is req:
                    break
                grown = self._grow(req, need)
            if req.status != Status.RUNNING:
                self._fail_if_too_long(req)
                continue  # preempted itself; running[i] is the next one now
            if grown is None:  # blocks come free as swap-outs land: it skips this step
                i += 1
                continue
            new_blocks, new_remote = grown
            scheduled.append(
                scheduled_seq(req, req.num_computed_tokens, num_new, new_blocks, new_remote)
            )
            budget -= num_new
            i += 1

        # No admissions in a step that had to preempt: memory is short already.
        admitted_now: set[str] = set()
        admitting = not preempted
        if admitting and self.swapping_in:
            budget = self._resume_swapped(budget, out, scheduled, admitted_now)
        while admitting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.policy.peek()
            if req is None or req.num_pending_tokens:
                break  # preempted with a token in flight: admit once it lands
            if self._start_fetch(req):  # back in the queue once its blocks are fetched
                self.policy.pop()
                continue
            admitted = self._admit(req, budget, out)
            while admitted is None and not self._landing(1):  # a worse priority gives way?
                victim = self.policy.preempt_for(
                    req, [r for r in self.running if r.request_id not in admitted_now]
                )
                if victim is None:
                    break
                self.running.remove(victim)
                budget += _unschedule(scheduled, victim.request_id)
                self._preempt(victim)
                preempted.append(victim.request_id)
                admitted = self._admit(req, budget, out)
            if admitted is None:
                if self.on_short is not None:
                    self.on_short(blocks_for(req.num_tokens, self.block_size))
                break
            if admitted is SWAPPING_IN:  # its copy runs; it joins a later step
                self.policy.pop()
                continue
            admitted_now.add(req.request_id)
            self.policy.pop()
            req.status = Status.RUNNING
            self.running.append(req)
            scheduled.append(admitted)
            budget -= admitted.num_new

        for s in scheduled:
            (out.decodes if s.num_new == 1 else out.prefills).append(s)
        self._preempted_ids += preempted
        self.tokens_scheduled += out.num_tokens
        if scheduled:
            out.finished_ids, self._finished_ids = self._finished_ids, []
            out.preempted_ids, self._preempted_ids = self._preempted_ids, []
            out.cached_blocks = self.pool.take_cached_log()
        return out

    def _admit(self, req: Request, budget: int, out: SchedulerOutput) -> ScheduledSeq | None:
        """Find the KV the request need not compute (prefix cache, then imported blocks) and
        allocate blocks for its first chunk. Returns None, changing nothing, if blocks lack."""
        if req.swapped_tokens:
            return self._admit_swapped(req, budget, out)
        bs = self.block_size
        limit = req.num_tokens - 1  # at least one token must be computed to get logits
        hits = self.pool.lookup(req.block_hashes[: limit // bs])
        computed = len(hits) * bs
        loads: list[tuple[int, KVBlock]] = []  # (block position, block)
        for pos in range(len(hits), len(req.imported_kv)):
            blk = req.imported_kv[pos]
            start = pos * bs
            if blk is None or start + blk.num_tokens > limit or not req.holds(pos, blk):
                break
            loads.append((pos, blk))
            computed = start + blk.num_tokens
            if blk.num_tokens < bs:
                break
        num_new = min(req.num_tokens - computed, budget)
        need = blocks_for(computed + num_new, bs) - len(hits)
        reclaimed = sum(1 for b in hits if self.pool.blocks[b].ref_cnt == 0)
        local = self.pool.num_free - reclaimed  # blocks it can take besides its hits
        borrowed: list[RemoteSegment] = []
        if need > local:
            if self.remote is None:
                return None
            if loads:  # imported KV enters local blocks only: recompute it instead
                loads, computed = [], len(hits) * bs
                num_new = min(req.num_tokens - computed, budget)
                need = blocks_for(computed + num_new, bs) - len(hits)
            seg = self.remote.borrow(req.request_id, len(hits) + local, need - local)
            if seg is None:
                # Lenders are short too: start with the chunk that fits locally, if any.
                num_new = min(num_new, (len(hits) + local) * bs - computed)
                if num_new <= 0:
                    return None
                need = blocks_for(computed + num_new, bs) - len(hits)
            else:
                borrowed, need = [seg], local
        self.pool.acquire(hits)
        req.block_ids = hits + self._allocate(need, hits[-1] if hits else None)
        req.remote = borrowed
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
        announce(req, out)
        return scheduled_seq(req, computed, num_new, [])  # its blocks are in NewRequestData

    def _preempt(self, req: Request) -> None:
        if not self._swap_out(req):
            self._release(req)
        req.num_computed_tokens = 0
        req.status = Status.WAITING
        req.tier_fetched = False
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.policy.requeue(req)

    def _grow(self, req: Request, need: int) -> tuple[list[int], tuple[RemoteSegment, ...]] | None:
        """Give a running request `need` more blocks: local ones while it has borrowed none
        and the pool has them, else borrowed (the local part first, so local stays a prefix).
        None, changing nothing, when neither is possible."""
        if need <= 0:
            return [], ()
        if not req.remote and self.pool.can_allocate(need):
            blocks = self._allocate(need, req.block_ids[-1] if req.block_ids else None)
            req.block_ids += blocks
            return blocks, ()
        if self.on_short is not None:  # this pool lends: its own work comes first
            self.on_short(need)
        if self.remote is None:
            return None
        local = 0 if req.remote else min(need, self.pool.num_free)
        seg = self.remote.borrow(req.request_id, req.num_blocks + local, need - local)
        if seg is None:
            return None
        blocks = self.pool.allocate(local)
        req.block_ids += blocks
        req.remote.append(seg)
        return blocks, (seg,)

    def _fail_if_too_long(self, req: Request) -> None:
        """A request that preempted itself and can never be held: not by the local pool, nor
        with all that creditors could lend even when idle. End it with an error instead of
        retrying forever. Short only for now (lenders busy, or unreachable), it waits."""
        need = blocks_for(req.num_tokens + 1, self.block_size)
        if need <= self.pool.num_blocks:
            return
        lendable = 0
        if self.remote is not None:
            if self.running:
                return  # what the running requests hold comes free as they finish
            lendable = self.remote.lendable()
            if lendable is None or need <= self.pool.num_blocks + lendable:
                return
        self.policy.remove(req)
        req.status = Status.FINISHED
        req.finish_reason = FinishReason.ABORT
        where = f"its KV creditors can lend {lendable} at most" if self.remote else "lending is off"
        self.failed.append(
            (
                req,
                f"the sequence needs {need} KV blocks; this replica has {self.pool.num_blocks} "
                f"and {where}",
            )
        )

    def drop_remote(
        self, request_ids: set[str] | None = None, holder_id: str | None = None
    ) -> list[str]:
        """Preempt (to recompute) running requests that hold blocks on holder_id (it was lost)
        or are named in request_ids (their creditor wants the blocks back)."""
        victims = [
            r
            for r in self.running
            if r.remote
            and (
                (request_ids is not None and r.request_id in request_ids)
                or any(s.holder_id == holder_id for s in r.remote)
            )
        ]
        for r in victims:
            self.running.remove(r)
            self._preempt(r)
            self._preempted_ids.append(r.request_id)
        return [r.request_id for r in victims]

    def preempt_all(self) -> list[str]:
        """Preempt every running request (to recompute): its KV was lost."""
        victims, self.running = self.running, []
        for r in victims:
            self._preempt(r)
            self._preempted_ids.append(r.request_id)
        return [r.request_id for r in victims]

    def _release(self, req: Request) -> None:
        self.pool.release(list(reversed(req.block_ids)))  # tail first: prefix evicted last
        req.block_ids = []
        if req.remote:
            req.remote = []
            if self.remote is not None:
                self.remote.release(req.request_id)

    def commit(self, req: Request, seq: ScheduledSeq) -> None:
        """The step computed seq's tokens (req's): advance and cache the blocks that became
        full."""
        req.num_computed_tokens = seq.end
        bs = self.block_size
        # A block whose last token is still pending has no hash yet; cache_hashed takes it.
        stop = min(seq.end // bs, len(req.block_hashes), len(req.block_ids))  # local blocks
        for j in range(seq.start // bs, stop):
            self.pool.cache(req.block_ids[j], req.block_hashes[j])

    def cache_hashed(self, req: Request, num_hashes_before: int) -> None:
        """Cache computed blocks that got their hash only now, when a token sampled by an
        earlier, already committed step was appended."""
        stop = min(
            len(req.block_hashes), req.num_computed_tokens // self.block_size, len(req.block_ids)
        )
        for j in range(num_hashes_before, stop):
            self.pool.cache(req.block_ids[j], req.block_hashes[j])

    def finish(self, req: Request, reason: FinishReason) -> None:
        """End a request anywhere in its life and release its blocks. Read any KV to export
        before calling this."""
        if req.status == Status.FINISHED:
            return
        swapping = [op for r, op in self.swapping_in if r is req]
        if req.status == Status.RUNNING:
            self.running.remove(req)
            self._finished_ids.append(req.request_id)
        elif swapping:  # its blocks are being written: they return once the copy is done
            self.swapping_in = [(r, op) for r, op in self.swapping_in if r is not req]
            self.swapping_out.append((swapping[0], list(reversed(req.block_ids))))
            req.block_ids = []
        elif self._forget_fetch(req):
            pass
        else:
            self.policy.remove(req)
        if self.swap is not None:
            self.swap.drop(req.request_id)
        req.swapped_tokens = 0
        self._release(req)
        req.status = Status.FINISHED
        req.finish_reason = reason


def _unschedule(scheduled: list[ScheduledSeq], request_id: str) -> int:
    """Take a request's seq out of this step's list; returns the tokens it had (0 if it had
    none: a request whose in-flight token is its last is not scheduled)."""
    for k, s in enumerate(scheduled):
        if s.request_id == request_id:
            del scheduled[k]
            return s.num_new
    return 0
