"""Preemption modes (recompute, per-block swap, FastSwitch): the tokens never change, the block
pool and the host blocks stay whole after every step, block groups make swaps few large copies,
multi-turn reuse sends only new blocks, swap space exhausted falls back to recompute, a request
whose swap-in is unfinished skips steps, and priority churn preempts running requests."""

from __future__ import annotations

import logging

import pytest

from services.engine.sampling_params import SamplingParams
from services.engine.swap_space import HostBlocks, runs_of
from tests.engine_helpers import greedy_or_seeded, make_engine, random_prompts, run_checked

MODES = ("recompute", "swap", "fastswitch")
GREEDY = SamplingParams(max_tokens=28, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(6, 2048, 20, 120, seed=5)


@pytest.fixture(scope="module")
def reference(tiny_model_dir, prompts):
    engine = make_engine(tiny_model_dir)
    return [o.token_ids for o in engine.generate(prompts, [greedy_or_seeded(i) for i in range(6)])]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_tokens_equal_without_preemption(tiny_model_dir, prompts, reference, mode, policy):
    engine = make_engine(
        tiny_model_dir, num_kv_blocks=20, max_num_batched_tokens=64, preemption_mode=mode,
        scheduling_policy=policy, swap_space_blocks=64,
    )  # fmt: skip
    tokens = run_checked(engine, prompts, churn=0.3 if policy == "priority" else 0.0)
    assert list(tokens.values()) == reference
    assert engine.num_preemptions > 0
    if mode != "recompute":
        swap = engine.scheduler.swap
        assert swap.num_swapped_out > 0 and swap.num_fallbacks == 0
        assert engine.swapper.blocks_copied > 0
        assert swap.copies == {} and swap.host.num_free == swap.host.num_blocks


def test_fastswitch_groups_and_reuse(tiny_model_dir, prompts, reference):
    """Block groups: a swap is a few runs, not one copy per block. Reuse: a request swapped
    out again sends only what it wrote since (its host copy stayed valid)."""
    engine = make_engine(
        tiny_model_dir, num_kv_blocks=20, max_num_batched_tokens=64,
        preemption_mode="fastswitch", scheduling_policy="priority",
    )  # fmt: skip
    ops = []
    submit = engine.swapper.submit
    engine.swapper.submit = lambda o: (ops.extend(o), submit(o))
    tokens = run_checked(engine, prompts, churn=0.3, seed=3)
    assert list(tokens.values()) == reference
    blocks = sum(op.num_blocks for op in ops)
    runs = sum(len(op.runs) for op in ops)
    # Per-block swap makes one run per block; groups merge them (a 20-block pool under churn
    # fragments, so about half here).
    assert blocks > 0 and runs < 0.75 * blocks, (runs, blocks)
    assert engine.swapper.blocks_copied == blocks


def test_per_block_swap_copies_each_block(tiny_model_dir, prompts, reference):
    engine = make_engine(
        tiny_model_dir, num_kv_blocks=20, max_num_batched_tokens=64, preemption_mode="swap"
    )
    ops = []
    submit = engine.swapper.submit
    engine.swapper.submit = lambda o: (ops.extend(o), submit(o))
    assert list(run_checked(engine, prompts).values()) == reference
    assert ops and all(op.per_block and all(n == 1 for _, _, n in op.runs) for op in ops)
    assert engine.scheduler.swap.blocks_reused == 0


@pytest.mark.parametrize("mode", ["swap", "fastswitch"])
def test_swap_space_exhausted_falls_back_to_recompute(
    tiny_model_dir, prompts, reference, mode, caplog
):
    engine = make_engine(
        tiny_model_dir, num_kv_blocks=20, max_num_batched_tokens=64, preemption_mode=mode,
        swap_space_blocks=3,
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="services.engine.swap_space"):
        tokens = run_checked(engine, prompts)
    assert list(tokens.values()) == reference
    assert engine.scheduler.swap.num_fallbacks > 0
    assert "swap space exhausted" in caplog.text


def test_unfinished_swap_in_skips_steps(tiny_model_dir, prompts, reference):
    """A swapped-in request whose copy is not done waits outside the batch; the others run."""
    engine = make_engine(
        tiny_model_dir, num_kv_blocks=20, max_num_batched_tokens=64, preemption_mode="fastswitch"
    )
    sched = engine.scheduler
    real = sched.swap_done
    held: dict[int, int] = {}

    def slow(op_id: int) -> bool:  # each op reports done only on its 4th query
        held[op_id] = held.get(op_id, 0) + 1
        return held[op_id] > 3 and real(op_id)

    sched.swap_done = slow
    skipped = 0
    orig = sched._resume_swapped

    def counting(budget, out, scheduled, now):
        nonlocal skipped
        before = len(sched.swapping_in)
        left = orig(budget, out, scheduled, now)
        skipped += len(sched.swapping_in) if before else 0
        return left

    sched._resume_swapped = counting
    assert list(run_checked(engine, prompts).values()) == reference
    assert skipped > 0


def test_waiting_high_priority_preempts_running_low(tiny_model_dir):
    """Blocks short: a waiting request of a better priority preempts a running worse one
    (vLLM's open issue #40004), and is not stuck behind it."""
    for mode in MODES:
        engine = make_engine(
            tiny_model_dir, num_kv_blocks=8, max_num_batched_tokens=64, block_size=16,
            scheduling_policy="priority", preemption_mode=mode,
        )  # fmt: skip
        low = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
        engine.add_request("low", list(range(1, 60)), low, priority=3)
        for _ in range(3):
            engine.step()
        engine.add_request("high", list(range(100, 150)), low, priority=0)
        done: list[str] = []
        for out in engine.run_until_done():
            if out.finished:
                done.append(out.request_id)
            engine.check_integrity()
        assert done == ["high", "low"], mode
        assert engine.num_preemptions >= 1


def test_set_priority_checks_and_reorders(tiny_model_dir):
    from services.engine.errors import InvalidRequestError

    engine = make_engine(tiny_model_dir, scheduling_policy="priority", max_num_seqs=1)
    for rid, prio in (("a", 0), ("b", 1), ("c", 2)):
        engine.add_request(rid, [1, 2, 3], SamplingParams(max_tokens=2), priority=prio)
    assert engine.set_priority("c", 0) and not engine.set_priority("zz", 0)
    with pytest.raises(InvalidRequestError, match=r"priority must be within \[0, 255\]"):
        engine.set_priority("a", 256)
    with pytest.raises(InvalidRequestError, match=r"priority must be within"):
        engine.add_request("d", [1], SamplingParams(max_tokens=2), priority=-1)
    order = [o.request_id for o in engine.run_until_done() if o.finished]
    assert order == ["a", "c", "b"]


def test_host_blocks_and_runs():
    h = HostBlocks(8, contiguous=True)
    a = h.allocate(3)
    b = h.allocate(2, after=a[-1])
    assert a + b == [0, 1, 2, 3, 4]
    h.release([1, 2])
    assert h.allocate(2) == [1, 2]  # the best fit, not the bigger run after 4
    assert h.allocate(4) is None and h.num_free == 3
    with pytest.raises(RuntimeError):
        h.release([7])  # never taken
    assert runs_of([(4, 0), (5, 1), (6, 2), (9, 3), (10, 5)], group=True) == (
        (4, 0, 3), (9, 3, 1), (10, 5, 1),
    )  # fmt: skip
    assert len(runs_of([(4, 0), (5, 1)], group=False)) == 2


def test_fastswitch_second_swap_out_sends_only_new_blocks(tiny_model_dir):
    """Multi-turn reuse: the host copy stays valid after swap-in, so a request preempted a
    second time sends only the blocks written since; its tokens do not change."""
    params = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    a_prompt = list(range(1, 61))
    ref = make_engine(tiny_model_dir).generate([a_prompt], params)[0].token_ids
    engine = make_engine(
        tiny_model_dir, num_kv_blocks=10, max_num_batched_tokens=64,
        scheduling_policy="priority", preemption_mode="fastswitch",
    )  # fmt: skip
    swap = engine.scheduler.swap
    engine.add_request("a", a_prompt, params, priority=3)
    tokens: list[int] = []

    def run_until(cond) -> None:
        for _ in range(2000):
            if cond():
                return
            for out in engine.step():
                if out.request_id == "a":
                    tokens.extend(out.new_token_ids)
            engine.check_integrity()
        raise AssertionError("condition not reached")

    run_until(lambda: len(tokens) >= 5)
    short = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    engine.add_request("b", list(range(200, 290)), short, priority=0)
    run_until(lambda: swap.num_swapped_out == 1)
    first_sent = swap.blocks_out
    run_until(lambda: engine.request_status("b") is None and len(tokens) >= 20)
    engine.add_request("c", list(range(300, 390)), short, priority=0)
    run_until(lambda: swap.num_swapped_out == 2)
    assert swap.blocks_reused >= first_sent - 1  # all but the partial block stayed valid
    assert swap.blocks_out - first_sent < first_sent + 3
    run_until(lambda: not engine.has_unfinished())
    assert tokens == ref


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
def test_tokens_equal_on_cuda(tiny_model_dir, prompts, mode):
    """The CUDA swap paths (pinned host blocks, copies on their own stream, events): float32,
    the same tokens as a run that never preempts."""
    base = {"device": "cuda", "dtype": "float32"}
    reference = make_engine(tiny_model_dir, **base).generate(
        prompts, [greedy_or_seeded(i) for i in range(len(prompts))]
    )
    engine = make_engine(
        tiny_model_dir, **base, num_kv_blocks=20, max_num_batched_tokens=64,
        preemption_mode=mode, scheduling_policy="priority", swap_space_blocks=64,
    )  # fmt: skip
    tokens = run_checked(engine, prompts, churn=0.3)
    assert list(tokens.values()) == [o.token_ids for o in reference]
    assert engine.num_preemptions > 0
