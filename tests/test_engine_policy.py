"""The scheduling policy seam and the SchedulerOutput contract.

Most tests step a Scheduler as the engine does, without a model: every seq is committed and
every sampled token is 0. Blocks hold 4 tokens, so the block ids below can be followed by hand:
the pool hands out free blocks in id order, and a released request's blocks return to the back
of the free queue tail first.
"""

import pytest

from services.engine.block_pool import BlockPool
from services.engine.config import EngineConfig
from services.engine.errors import InvalidRequestError
from services.engine.request import FinishReason, Request
from services.engine.sampling_params import SamplingParams
from services.engine.sched_output import NewRequestData, ScheduledSeq, SchedulerOutput
from services.engine.sched_policy import make_policy
from services.engine.scheduler import Scheduler
from tests.engine_helpers import make_engine, random_prompts

BS = 4
PARAMS = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


class Steps:
    """A scheduler driven like a synchronous engine: schedule, commit, append the sampled
    token (always 0), finish requests at max_tokens."""

    def __init__(self, policy: str, num_blocks: int, max_num_seqs: int = 8) -> None:
        self.pool = BlockPool(num_blocks)
        self.sched = Scheduler(self.pool, BS, max_num_seqs, 64, make_policy(policy))
        self.reqs: dict[str, Request] = {}
        self.clock = 0.0

    def add(self, rid: str, prompt: list[int], priority: int = 0, max_tokens: int = 8) -> None:
        self.clock += 1.0
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        req = Request(rid, prompt, params, self.clock, BS, "m", priority=priority)
        self.reqs[rid] = req
        self.sched.add(req)

    def step(self) -> SchedulerOutput:
        so = self.sched.schedule()
        for s in so.seqs:
            req = self.reqs[s.request_id]
            self.sched.commit(req, s)
            if s.samples:
                hashed = len(req.block_hashes)
                req.output_token_ids.append(0)
                req.update_hashes()
                self.sched.cache_hashed(req, hashed)
                if req.num_output_tokens == req.params.max_tokens:
                    self.sched.finish(req, FinishReason.LENGTH)
        self.pool.check_integrity()
        return so

    def run_out(self, max_steps: int = 200) -> None:
        for _ in range(max_steps):
            if not self.sched.num_unfinished:
                break
            self.step()
        assert all(r.num_output_tokens == r.params.max_tokens for r in self.reqs.values())
        assert self.pool.usage().in_use == 0


def ids(so: SchedulerOutput) -> list[str]:
    return [s.request_id for s in so.seqs]


@pytest.mark.parametrize(
    ("policy", "order"),
    [
        # Two slots: a and b come first, c and d take the slots when a and b finish.
        ("fcfs", [["a", "b"], ["a", "b"], ["c", "d"], ["c", "d"]]),
        # Priority 0 first (b before d: they tie, b came first), then c (1), then a (2).
        ("priority", [["b", "d"], ["b", "d"], ["c", "a"], ["c", "a"]]),
    ],
)
def test_policy_orders_admission(policy, order):
    st = Steps(policy, num_blocks=16, max_num_seqs=2)
    for rid, prio in (("a", 2), ("b", 0), ("c", 1), ("d", 0)):
        st.add(rid, [1, 2, 3], priority=prio, max_tokens=2)
    assert [ids(st.step()) for _ in range(4)] == order
    assert not st.sched.num_unfinished


@pytest.mark.parametrize(
    ("policy", "step3", "victim", "blocks"),
    [
        # c is the newest running request: it gives way itself; a and b run.
        ("fcfs", ["a", "b"], "c", {"a": [0, 1], "b": [2, 4], "c": []}),
        # a has the highest priority value: it had been served first in step 3 and gives its
        # slice back; its blocks, released tail first, free block 1 for c.
        ("priority", ["b", "c"], "a", {"a": [], "b": [2, 4], "c": [3, 1]}),
    ],
)
def test_policy_names_the_preemption_victim(policy, step3, victim, blocks):
    # 5 blocks of 4 tokens. Step 1: a (priority 5) prefills its 4 prompt tokens in block 0.
    # Step 2: a decodes into block 1; b and c (priority 0) arrive and prefill in blocks 2, 3.
    # Step 3: a decodes within block 1, b takes block 4 for its 5th token, and c needs a block
    # that isn't there.
    st = Steps(policy, num_blocks=5)
    st.add("a", [1, 2, 3, 4], priority=5)
    assert ids(st.step()) == ["a"]
    st.add("b", [5, 6, 7, 8])
    st.add("c", [9, 10, 11, 12])
    assert ids(st.step()) == ["a", "b", "c"]
    so = st.step()
    assert ids(so) == step3
    assert so.preempted_ids == [victim]
    assert {r: st.reqs[r].block_ids for r in "abc"} == blocks
    assert st.reqs[victim].num_computed_tokens == 0
    st.run_out()


def test_scheduler_output_carries_full_data_once_then_diffs():
    """The fcfs run of the test above, step by step, as the runner sees it."""
    st = Steps("fcfs", num_blocks=5)
    st.add("a", [1, 2, 3, 4])
    so = st.step()
    assert so.new_requests == [NewRequestData("a", [1, 2, 3, 4], [], PARAMS, [0], 0)]
    assert so.prefills == [ScheduledSeq("a", 0, 4, [], samples=True)]
    st.add("b", [5, 6, 7, 8])
    st.add("c", [9, 10, 11, 12])
    so = st.step()
    # a is known: only its new block and its slice; b and c arrive in full.
    assert so.decodes == [ScheduledSeq("a", 4, 1, [1], samples=True)]
    assert so.new_requests == [
        NewRequestData("b", [5, 6, 7, 8], [], PARAMS, [2], 0),
        NewRequestData("c", [9, 10, 11, 12], [], PARAMS, [3], 0),
    ]
    so = st.step()
    assert so.preempted_ids == ["c"] and so.new_requests == [] and so.finished_ids == []
    assert so.decodes == [
        ScheduledSeq("a", 5, 1, [], samples=True),
        ScheduledSeq("b", 4, 1, [4], samples=True),
    ]
    # Steps 4-8: a and b decode. In step 6 a's 9th token needs a block: the only free one is
    # block 3, where c's prefix stayed cached; it is evicted. In step 7 b's 9th token finds no
    # block and b, now the newest running request, gives way. a ends in step 8.
    runs = [(ids(so), so.preempted_ids, [(s.request_id, s.new_block_ids) for s in so.seqs])
            for so in (st.step() for _ in range(5))]  # fmt: skip
    assert runs == [
        (["a", "b"], [], [("a", []), ("b", [])]),
        (["a", "b"], [], [("a", []), ("b", [])]),
        (["a", "b"], [], [("a", [3]), ("b", [])]),
        (["a"], ["b"], [("a", [])]),
        (["a"], [], [("a", [])]),
    ]
    assert st.reqs["a"].is_finished
    # Step 9 tells the runner, once, that a finished, and brings b and c back in full, with the
    # tokens they sampled: b first (it went back to the front of the queue last), resuming
    # from its two cached blocks; c, whose cached block a took, from the start.
    so = st.step()
    assert so.finished_ids == ["a"]
    assert so.new_requests == [
        NewRequestData("b", [5, 6, 7, 8], [0] * 5, PARAMS, [2, 4, 3], 8),
        NewRequestData("c", [9, 10, 11, 12], [0], PARAMS, [1, 0], 0),
    ]
    assert so.seqs == [ScheduledSeq("b", 8, 1, [], True), ScheduledSeq("c", 0, 5, [], True)]
    assert st.step().finished_ids == []
    st.run_out()


def test_finished_ids_wait_for_a_step_that_runs():
    """A step that computes nothing does not reach the runner: what it would have told waits."""
    st = Steps("fcfs", num_blocks=8)
    st.add("a", [1, 2, 3], max_tokens=1)
    st.step()  # a samples its only token and finishes
    assert st.step().finished_ids == []  # nothing to run: the scheduler keeps "a"
    assert st.sched.ids_to_drop() == {"a"}
    st.add("a", [7, 8, 9], max_tokens=1)  # the id is free again
    so = st.step()
    # Forget the old "a" first, then take the new one: the order SchedulerOutput states.
    assert so.finished_ids == ["a"] and [n.request_id for n in so.new_requests] == ["a"]
    assert so.new_requests[0].prompt_token_ids == [7, 8, 9]


def test_priority_engine_under_preemption_equals_fcfs_tokens(tiny_model_dir, checked):
    """Order changes, tokens don't: with priorities and preemption the greedy tokens equal an
    unhurried FCFS run, and the runner's copy of every request stays in step (checked)."""
    prompts = random_prompts(6, 2048, 20, 140, seed=11)
    short = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    reference = [o.token_ids for o in make_engine(tiny_model_dir).generate(prompts, short)]
    engine = checked(
        make_engine(
            tiny_model_dir, num_kv_blocks=24, max_num_batched_tokens=64,
            scheduling_policy="priority",
        )
    )  # fmt: skip
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, short, priority=[2, 0, 1][i % 3])
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    finished = []
    for out in engine.run_until_done():
        tokens[out.request_id] += out.new_token_ids
        if out.finished:
            finished.append(out.request_id)
    assert engine.scheduler.num_preemptions > 0
    # They end in priority order, ties in arrival order (fcfs ends them r0 to r5).
    assert finished == ["r1", "r4", "r2", "r5", "r0", "r3"]
    assert list(tokens.values()) == reference


def test_unknown_policy_and_bad_priority_are_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="scheduling_policy must be one of fcfs, priority"):
        EngineConfig(scheduling_policy="lifo")
    engine = make_engine(tiny_model_dir, scheduling_policy="priority")
    with pytest.raises(InvalidRequestError, match=r"priority must be an integer, got 1\.5"):
        engine.add_request("x", [1, 2, 3], PARAMS, priority=1.5)
    assert not engine.has_unfinished()
