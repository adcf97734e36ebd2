"""The engine's invariants, checked on demand (tests, and `LLMEngine.check_integrity`): the
block pool's own, every block in use held by exactly its live requests (or lent to another
engine), and the runner's copy of each running request equal to the scheduler's."""

from __future__ import annotations

from typing import TYPE_CHECKING

from services.engine.block_pool import PoolUsage

if TYPE_CHECKING:
    from services.engine.engine import LLMEngine


def check_engine(engine: LLMEngine) -> PoolUsage:
    """Raise AssertionError naming the first broken invariant; return the pool's usage."""
    pool, scheduler = engine.pool, engine.scheduler
    usage = pool.check_integrity()
    held: dict[int, int] = {}
    swapping_in = [r for r, _ in scheduler.swapping_in]
    for r in [*scheduler.running, *swapping_in]:
        for b in r.block_ids:
            held[b] = held.get(b, 0) + 1
    for _, blocks in scheduler.swapping_out:  # their copy to the host is in flight
        for b in blocks:
            held[b] = held.get(b, 0) + 1
    for b in engine.lent_blocks() if engine.lent_blocks is not None else ():
        held[b] = held.get(b, 0) + 1
    for b in pool.blocks:
        if b.ref_cnt != held.get(b.block_id, 0):
            raise AssertionError(
                f"block {b.block_id}: ref_cnt {b.ref_cnt}, held {held.get(b.block_id, 0)}"
            )
    if any(r.block_ids for r in scheduler.policy):
        raise AssertionError("a waiting request holds blocks")
    if scheduler.swap is not None:
        _check_swap(scheduler)
    _check_runner_states(engine)
    return usage


def _check_runner_states(engine: LLMEngine) -> None:
    """The runner knows every running request, with the same tokens and blocks (local and
    remote), and no request the scheduler has not told it (yet) to forget."""
    scheduler, states = engine.scheduler, engine.runner.requests
    known = states.ids()
    running = {r.request_id for r in scheduler.running}
    if not running <= known:
        raise AssertionError(f"the runner does not know running requests {running - known}")
    stale = known - running - scheduler.ids_to_drop()
    if stale:
        raise AssertionError(f"the runner keeps requests that left: {stale}")
    if engine.has_step_in_flight:
        return  # tokens of the step in flight are not read yet
    for r in scheduler.running:
        st = states[r.request_id]
        same = (
            st.prompt_token_ids == r.prompt_token_ids
            and st.output_token_ids == r.output_token_ids
            and st.block_ids == r.block_ids
            and st.remote == r.remote
            and st.num_pending == 0
        )
        if not same:
            raise AssertionError(f"the runner's copy of request {r.request_id} differs")


def _check_swap(scheduler) -> None:
    """Host blocks are held by exactly the live requests' host copies, once each, and every
    swapped-out request has its copy."""
    swap = scheduler.swap
    used: list[int] = [b for hc in swap.copies.values() for b in hc.blocks]
    if len(used) != len(set(used)):
        raise AssertionError("a host block belongs to two host copies")
    if sorted(used) != sorted(int(i) for i in (~swap.host.free).nonzero()[0]):
        raise AssertionError("host blocks in use differ from those of the host copies")
    for r in scheduler.policy:
        if r.swapped_tokens and swap.host_tokens(r.request_id) < r.swapped_tokens:
            raise AssertionError(f"swapped-out request {r.request_id} has no host copy")
