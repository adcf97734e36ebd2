"""The KV tier behind the swap space (services/engine/kv_tier.py): a preempted request's
leading blocks that the tier holds are not copied to the host nor recomputed, they are fetched
back; blocks the tier lost, and a tier that fails, cost only recomputation. Tokens never
change, and the pool and host blocks stay whole after every step."""

from __future__ import annotations

import threading
from concurrent.futures import Future

import pytest

from tests.engine_helpers import greedy_or_seeded, make_engine, random_prompts, run_checked

MODES = ("recompute", "swap", "fastswitch")
BS = 16


class BlockStore:
    """A KV tier over blocks in memory, answering on its own thread like a remote store;
    `fail` makes every fetch raise."""

    def __init__(self, blocks) -> None:
        self.blocks = {b.block_hash: b for b in blocks}
        self.fail = False
        self.asked = 0

    def fetch(self, hashes):
        self.asked += len(hashes)
        fut: Future = Future()

        def answer() -> None:
            if self.fail:
                fut.set_exception(ConnectionError("store unreachable"))
            else:
                fut.set_result([self.blocks.get(h) for h in hashes])

        threading.Timer(0.001, answer).start()
        return fut


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(6, 2048, 40, 120, seed=7)


@pytest.fixture(scope="module")
def reference(tiny_model_dir, prompts):
    """Tokens of a run that never preempts, and the prompts' KV as the store holds it."""
    engine = make_engine(tiny_model_dir)
    done = engine.generate(
        prompts, [greedy_or_seeded(i) for i in range(len(prompts))], export_kv=True
    )
    blocks = [b for c in done for b in c.kv_blocks[: len(c.prompt_token_ids) // BS]]
    return [c.token_ids for c in done], blocks


def _tokens(engine, prompts, seed: int = 0) -> list[list[int]]:
    return list(run_checked(engine, prompts, churn=0.3, seed=seed, stored=True).values())


def _engine(tiny_model_dir, mode: str, store: BlockStore, **cfg):
    engine = make_engine(
        tiny_model_dir, num_kv_blocks=20, max_num_batched_tokens=64, preemption_mode=mode,
        scheduling_policy="priority", swap_space_blocks=64, **cfg,
    )  # fmt: skip
    engine.attach_kv_tier(store)
    return engine


@pytest.mark.parametrize("mode", MODES)
def test_tier_blocks_fetched_not_swapped_nor_recomputed(tiny_model_dir, prompts, reference, mode):
    tokens, blocks = reference
    store = BlockStore(blocks)
    engine = _engine(tiny_model_dir, mode, store)
    assert _tokens(engine, prompts) == tokens
    sched = engine.scheduler
    assert engine.num_preemptions > 0
    assert sched.tier_blocks_fetched > 0 and sched.tier_blocks_missed == 0
    assert sched.fetching == {}
    if mode != "recompute":
        assert sched.swap.blocks_in_tier > 0  # not sent to the host
        assert sched.swap.copies == {} and sched.swap.host.num_free == sched.swap.host.num_blocks


@pytest.mark.parametrize("mode", MODES)
def test_blocks_the_tier_lost_are_recomputed(tiny_model_dir, prompts, reference, mode):
    tokens, blocks = reference
    store = BlockStore(blocks[::2])  # every other block evicted from the store
    engine = _engine(tiny_model_dir, mode, store)
    assert _tokens(engine, prompts, seed=1) == tokens
    assert engine.scheduler.tier_blocks_missed > 0


@pytest.mark.parametrize("mode", ["recompute", "fastswitch"])
def test_a_failing_tier_costs_only_recomputation(tiny_model_dir, prompts, reference, mode):
    tokens, blocks = reference
    store = BlockStore(blocks)
    store.fail = True
    engine = _engine(tiny_model_dir, mode, store)
    assert _tokens(engine, prompts, seed=2) == tokens
    assert store.asked > 0 and engine.scheduler.tier_blocks_fetched == 0


def test_abort_while_fetching_frees_everything(tiny_model_dir, prompts, reference):
    _, blocks = reference
    store = BlockStore(blocks)
    engine = _engine(tiny_model_dir, "fastswitch", store)
    for i, p in enumerate(prompts):
        engine.add_request(
            f"r{i}", p, greedy_or_seeded(i), priority=i % 4, stored_blocks=len(p) // BS
        )
    aborted = set()
    for _ in range(5000):
        if not engine.has_unfinished():
            break
        for rid in list(engine.scheduler.fetching):
            assert engine.abort(rid)
            aborted.add(rid)
        engine.step()
        engine.check_integrity()
    assert aborted, "no request was ever fetching"
    assert not engine.has_unfinished()
    engine.swapper.wait_all()
    engine.scheduler._reap_swaps()
    assert engine.check_integrity().in_use == 0
