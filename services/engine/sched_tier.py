"""The scheduler's side of the KV tier (services/engine/kv_tier.py): a preempted request whose
leading blocks the tier holds leaves the queue while they are fetched, and comes back to it
with them as imported KV, ahead of the requests it was ahead of."""

from __future__ import annotations

from concurrent import futures
from concurrent.futures import Future

from services.engine.block_pool import BlockPool
from services.engine.kv_tier import KVTier, fetched_blocks
from services.engine.request import Request
from services.engine.sched_policy import SchedulingPolicy
from services.engine.swap_space import SwapSpace


class TierScheduling:
    pool: BlockPool
    policy: SchedulingPolicy
    swap: SwapSpace | None
    block_size: int

    def _init_tier(self, tier: KVTier | None) -> None:
        self.tier = tier
        # Requests out of the queue while their blocks come from the tier: (request, block
        # positions [start, end) asked for, the fetch).
        self.fetching: dict[str, tuple[Request, int, int, Future]] = {}
        self.tier_blocks_fetched = 0  # blocks that came back from the tier
        self.tier_blocks_missed = 0  # blocks asked for that the tier no longer had

    def tier_skip(self, req: Request, computed: int) -> int:
        """Leading blocks of a request being swapped out that need not go to the host: the
        tier holds them."""
        if self.tier is None:
            return 0
        return min(req.stored_blocks, computed // self.block_size)

    def _tier_span(self, req: Request) -> tuple[int, int]:
        """Block positions [start, end) to fetch before admitting a preempted request: past the
        prefix cache's hits, up to what the tier holds and the request needs from outside
        (a swapped-out one: up to its host copy)."""
        if self.tier is None or not req.stored_blocks or req.tier_fetched:
            return 0, 0
        if req.num_preemptions == 0 or req.imported_kv:
            return 0, 0  # never computed here yet: its own imported KV comes with it
        bs = self.block_size
        if req.swapped_tokens:
            assert self.swap is not None
            end = min(req.stored_blocks, self.swap.host_first(req.request_id))
        else:
            end = min(req.stored_blocks, (req.num_tokens - 1) // bs)
        return len(self.pool.lookup(req.block_hashes[:end])), end

    def _start_fetch(self, req: Request) -> bool:
        """Start fetching what a preempted request needs from the tier, if anything: True when
        it leaves the queue for that."""
        start, end = self._tier_span(req)
        if end <= start:
            return False
        assert self.tier is not None
        fut = self.tier.fetch(list(req.block_hashes[start:end]))
        self.fetching[req.request_id] = (req, start, end, fut)
        return True

    def _reap_fetches(self) -> None:
        """Finished fetches: their requests return to the queue with the blocks as imported
        KV (missing ones, and all after them, are recomputed)."""
        for rid, (req, start, end, fut) in list(self.fetching.items()):
            if not fut.done():
                continue
            del self.fetching[rid]
            blocks = fetched_blocks(req, start, fut)
            self.tier_blocks_fetched += len(blocks)
            self.tier_blocks_missed += end - start - len(blocks)
            req.imported_kv = [None] * start + list(blocks)
            req.tier_fetched = True
            self.policy.requeue(req)

    def _forget_fetch(self, req: Request) -> bool:
        """A request ended while its fetch ran: the fetch's answer is dropped."""
        return self.fetching.pop(req.request_id, None) is not None

    def wait_fetch(self, timeout: float) -> None:
        """Wait up to `timeout` s for any fetch to land."""
        pending = [f for *_, f in self.fetching.values()]
        futures.wait(pending, timeout, return_when=futures.FIRST_COMPLETED)
