"""What the DistAttention and lending tests share: fixtures for attention replicas and the
cluster they join, a borrowing decoder, a bounded step driver, and the single-engine reference
the tokens are held to (imported as fixtures by those test modules)."""

from __future__ import annotations

import time

import pytest

from kvstore.config import Membership
from kvstore.lending import Ledger
from services.attention import AttentionServer, spawn
from services.attention_client import AttentionPeers
from services.config import AttentionConfig
from services.engine.config import EngineConfig
from services.engine.sampling_params import SamplingParams
from tests.engine_helpers import make_engine

# logprobs=0: each token's log-probability too, so a numeric error shows even where a tiny
# random model repeats one token.
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=0)
BS = 16


@pytest.fixture
def cluster(redis_url, namespace):
    return Membership(redis_url=redis_url, namespace=namespace, heartbeat_s=0.25, ttl_s=1.5)


@pytest.fixture
def replicas(loop_thread, cluster, tiny_model_dir):
    """start(num_blocks, lend_fraction, model_dir=tiny, cluster=the test's, **engine) -> a
    running attention replica; all stopped after, once nothing stays lent."""
    started: list[AttentionServer] = []

    def start(
        num_blocks: int = 64, lend_fraction: float = 1.0, model_dir=None, on=None, **engine
    ) -> AttentionServer:
        cfg = AttentionConfig(
            name="tiny", model=model_dir or tiny_model_dir, cluster=on or cluster,
            lend_fraction=lend_fraction,
            engine=EngineConfig(num_kv_blocks=num_blocks, block_size=BS, **engine),
        )  # fmt: skip
        s = AttentionServer(cfg)
        loop_thread.run(s.start())
        started.append(s)
        return s

    yield start
    # Whatever the test did, once its borrowers are gone nothing stays lent, here or in the
    # ledger (lent == borrowed == 0).
    live = [s for s in started if s.ledger is not None and not getattr(s, "killed", False)]
    deadline = time.monotonic() + 20
    while any(s.holder.lent for s in live) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [s.holder.lent for s in live] == [0] * len(live)
    if live:
        assert settled_debts(live[0].ledger) == {}
    for s in started:
        if not getattr(s, "killed", False):
            loop_thread.run(s.stop(drain_s=0.5))
        elif s.registration is not None:  # its server is gone; its threads go too
            s.registration.close()
            loop_thread.run(s.lender.stop_ledger())


def decoder(model_dir, cluster, num_kv_blocks=8, shared=True, borrower_id="decoder-0", **cfg):
    """An engine with a small pool that borrows through the ledger (as a decode replica);
    shared: layer batches through shared memory (else as bytes in the messages)."""
    e = make_engine(model_dir, num_kv_blocks=num_kv_blocks, block_size=BS, **cfg)
    ledger = Ledger(cluster.redis_url, cluster.namespace, cluster.ttl_s)
    peers = AttentionPeers.for_engine(e, ledger, borrower_id, shared=shared)
    e.attach_remote_kv(peers)
    return e, peers


def settled_debts(ledger: Ledger, timeout_s: float = 20.0) -> dict:
    """The ledger once releases (sent without waiting) have landed: nobody owes anything."""
    deadline = time.monotonic() + timeout_s
    while True:
        debts = {c: d for c, d in ledger.debts().items() if d}
        if not debts or time.monotonic() > deadline:
            return debts
        time.sleep(0.05)


def drive(engine, requests: dict, between=None, max_steps: int = 3000):
    """Run requests {id: (prompt, params)} on the engine step by step (bounded), calling
    between(outs) after each step. Returns ({id: trace}, {id: error})."""
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    outs: dict[str, list] = {rid: [] for rid in requests}
    errors: dict[str, str] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            break
        for out in engine.step():
            if out.error:
                errors[out.request_id] = out.error
            outs[out.request_id] += trace(out.logprobs)
        if between is not None:
            between(outs)
    assert not engine.has_unfinished(), "the requests did not finish in the step bound"
    return outs, errors


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """Greedy tokens of one engine holding every sequence locally."""
    engine = make_engine(tiny_model_dir, block_size=BS)
    cache: dict = {}

    def tokens(prompts: list[list[int]]) -> list[list[tuple[int, float]]]:
        key = tuple(map(tuple, prompts))
        if key not in cache:
            cache[key] = traces(engine.generate(prompts, GREEDY))
        return cache[key]

    return tokens


def trace(logprobs) -> list[tuple[int, float]]:
    """Tokens with their log-probabilities rounded to 1e-4: what runs are compared by."""
    return [(t.token_id, round(t.logprob, 4)) for t in logprobs]


def traces(completions) -> list[list[tuple[int, float]]]:
    return [trace(c.logprobs) for c in completions]


def same_tokens(got, want, tol: float = 1e-3) -> None:
    """Equal tokens; log-probabilities equal within tol. A CPU step's products depend a little
    on how many rows it holds (oneDNN picks its kernel by shape), and a sequence spread over
    holders or merged in float32 is batched differently from the local reference."""
    assert [[t for t, _ in s] for s in got] == [[t for t, _ in s] for s in want]
    for g, w in zip(got, want, strict=True):
        assert max((abs(a - b) for (_, a), (_, b) in zip(g, w, strict=True)), default=0) < tol


def replica_process(model_dir, cluster, num_blocks: int, device: str = "cpu", dtype: str = "auto"):
    """An attention replica in its own process, serving (one torch thread on a CPU)."""
    return spawn(
        model_dir, cluster.redis_url, cluster.namespace, num_blocks, block_size=BS,
        device=device, dtype=dtype, cpu_threads=1,
    )  # fmt: skip
