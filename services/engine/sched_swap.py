"""The swap side of the scheduler (preemption_mode swap or fastswitch): a preempted request's KV
goes to host blocks and comes back when it is admitted again (services/engine/swap_space.py).
Asynchronous swaps (fastswitch) hold the swapped-out blocks until their copy is done, and a
swapped-in request joins the batch only once its copy is. Scheduler builds on this class; the
helpers here are the scheduler's own too."""

from __future__ import annotations

from collections.abc import Callable

from services.engine.block_pool import BlockPool
from services.engine.remote_kv import RemoteSegment
from services.engine.request import Request, Status
from services.engine.sched_output import NewRequestData, ScheduledSeq, SchedulerOutput
from services.engine.swap_space import SwapSpace


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def scheduled_seq(
    req: Request,
    start: int,
    num_new: int,
    new_block_ids: list[int],
    new_remote: tuple[RemoteSegment, ...] = (),
) -> ScheduledSeq:
    samples = start + num_new == req.num_tokens + req.num_pending_tokens  # its last token
    return ScheduledSeq(req.request_id, start, num_new, new_block_ids, samples, new_remote)


# _admit's answer for a request whose swap-in copy was started: it joins a later step.
SWAPPING_IN = object()


def announce(req: Request, out: SchedulerOutput) -> None:
    """The runner learns the request in full (blocks, tokens, what is computed already)."""
    out.new_requests.append(
        NewRequestData(
            req.request_id, list(req.prompt_token_ids), list(req.output_token_ids), req.params,
            list(req.block_ids), req.num_computed_tokens, list(req.remote),
        )
    )  # fmt: skip


class SwapScheduling:
    """Swap state and the swap steps of a Scheduler (which owns the pool, the running batch
    and the limits these read)."""

    pool: BlockPool
    swap: SwapSpace | None
    block_size: int
    max_num_seqs: int
    running: list[Request]
    tier_skip: Callable[[Request, int], int]
    _admit: Callable[[Request, int, SchedulerOutput], ScheduledSeq | None]

    def _init_swaps(self, swap: SwapSpace | None) -> None:
        self.swap = swap
        # Whether a swap op's copies are complete (the engine's Swapper answers).
        self.swap_done: Callable[[int], bool] = lambda op_id: True
        # Swapped in, copy in flight: they hold their blocks and join the batch once done.
        self.swapping_in: list[tuple[Request, int]] = []
        # Blocks of swapped-out requests whose copy to the host is in flight, by op.
        self.swapping_out: list[tuple[int, list[int]]] = []

    def _landing(self, need: int) -> bool:
        """The free blocks plus those of swap-outs in flight cover `need`: wait for them
        rather than preempt more (an asynchronous swap-out frees nothing at once)."""
        if not self.swapping_out:
            return False
        return self.pool.num_free + sum(len(b) for _, b in self.swapping_out) >= need

    def _reap_swaps(self) -> None:
        """Blocks whose swap-out copy is done go back to the pool."""
        keep = []
        for op_id, blocks in self.swapping_out:
            if self.swap_done(op_id):
                self.pool.release(blocks)
            else:
                keep.append((op_id, blocks))
        self.swapping_out = keep

    def _admit_swapped(self, req: Request, budget: int, out: SchedulerOutput):
        """A swapped-out request comes back: its full blocks the prefix cache still holds are
        taken as they are, those the KV tier held were fetched (imported KV), the rest is
        copied back from the host. Synchronous swap: it runs in this step (the copy runs
        first). Asynchronous: SWAPPING_IN, it joins once copied. A tier block missing before
        the host copy starts: the host copy is dropped and the request recomputed from there."""
        assert self.swap is not None
        bs = self.block_size
        n = req.swapped_tokens
        nblk = blocks_for(n, bs)
        hits = self.pool.lookup(req.block_hashes[: n // bs])
        first = self.swap.host_first(req.request_id)
        loads = req.imported_kv[len(hits) : first]
        if len(hits) < first and (len(loads) < first - len(hits) or None in loads):
            self.swap.drop(req.request_id)
            req.swapped_tokens = 0
            return self._admit(req, budget, out)
        num_new = min(req.num_tokens - n, budget)
        need = blocks_for(n + num_new, bs) - len(hits)
        reclaimed = sum(1 for b in hits if self.pool.blocks[b].ref_cnt == 0)
        if need > self.pool.num_free - reclaimed:
            return None
        self.pool.acquire(hits)
        req.block_ids = hits + self._allocate(need, hits[-1] if hits else None)
        for pos, blk in enumerate(loads, len(hits)):  # full blocks: they join the prefix cache
            out.kv_loads.append((req.block_ids[pos], blk.kv))
            self.pool.cache(req.block_ids[pos], req.block_hashes[pos])
        req.imported_kv = []
        start = max(len(hits), first)
        op = self.swap.swap_in(req.request_id, start, req.block_ids[start:nblk])
        req.swapped_tokens = 0
        req.num_computed_tokens = n
        if self.swap.group and op is not None:
            self.swapping_in.append((req, op.op_id))
            return SWAPPING_IN
        announce(req, out)
        return scheduled_seq(req, n, num_new, [])

    def _resume_swapped(
        self, budget: int, out: SchedulerOutput, scheduled: list[ScheduledSeq], now: set[str]
    ) -> int:
        """Swapped-in requests whose copy is done join the batch (in the order they came
        back); the others skip this step. Returns the budget left."""
        keep = []
        for req, op_id in self.swapping_in:
            ready = budget > 0 and len(self.running) < self.max_num_seqs and self.swap_done(op_id)
            if ready:
                num_new = min(req.num_tokens - req.num_computed_tokens, budget)
                need = blocks_for(req.num_computed_tokens + num_new, self.block_size)
                need -= len(req.block_ids)
                ready = self.pool.can_allocate(max(need, 0))
            if not ready:
                keep.append((req, op_id))
                continue
            if need > 0:
                req.block_ids += self._allocate(need, req.block_ids[-1] if req.block_ids else None)
            req.status = Status.RUNNING
            self.running.append(req)
            now.add(req.request_id)
            announce(req, out)
            seq = scheduled_seq(req, req.num_computed_tokens, num_new, [])
            scheduled.append(seq)
            budget -= num_new
        self.swapping_in = keep
        return budget

    def _swap_out(self, req: Request) -> bool:
        """Preempt by swapping: its computed KV goes to the host. False: recompute instead
        (recompute mode, borrowed blocks, nothing computed, or no host room)."""
        n = req.num_computed_tokens
        if self.swap is None or req.remote or n == 0:
            return False
        nblk = blocks_for(n, self.block_size)
        evictable = [r.request_id for r in self.running if r is not req]
        skip = self.tier_skip(req, n)
        op = self.swap.swap_out(req.request_id, req.block_ids[:nblk], n, evictable, skip)
        if op is False:
            return False
        req.swapped_tokens = n
        blocks = list(reversed(req.block_ids))  # tail first: prefix evicted last
        req.block_ids = []
        if op is not None and self.swap.group:  # held until the copy from them is done
            self.swapping_out.append((op.op_id, blocks))
        else:  # synchronous: the copy runs before anything else reuses them
            self.pool.release(blocks)
        return True

    def _allocate(self, n: int, after: int | None) -> list[int]:
        """n blocks; as a contiguous group continuing `after` under fastswitch."""
        if self.swap is not None and self.swap.group:
            return self.pool.allocate_group(n, after)
        return self.pool.allocate(n)
