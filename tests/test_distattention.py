"""DistAttention end to end: a decoder with a small KV pool borrows blocks from real attention
replicas (gRPC, Redis ledger) and attends over them where they are; its greedy tokens and their
log-probabilities equal those of one engine holding everything locally."""

from __future__ import annotations

import pytest

from tests.dist_helpers import (
    BS,
    GREEDY,
    decoder,
    replica_process,
    same_tokens,
    settled_debts,
    traces,
)
from tests.engine_helpers import make_engine, random_prompts


@pytest.mark.parametrize("shared", [True, False], ids=["shm", "bytes"])
@pytest.mark.parametrize("holders", [1, 2, 3])
def test_one_sequence_over_holders_is_token_exact(
    holders, shared, tiny_model_dir, cluster, replicas, reference
):
    """One long sequence (20 blocks): 8 local blocks plus, with 2 holders, one replica and,
    with 3, two replicas whose small caps (12 blocks) force the tail across both."""
    cap = {2: 24, 3: 12}.get(holders, 0)
    reps = [replicas(num_blocks=64, lend_fraction=cap / 64) for _ in range(holders - 1)]
    prompt = random_prompts(1, 256, 300, 300, seed=3)
    engine, peers = decoder(tiny_model_dir, cluster, shared=shared, max_num_batched_tokens=64)
    if holders == 1:  # the local pool alone: it must hold everything
        engine, peers = make_engine(tiny_model_dir, num_kv_blocks=32, block_size=BS), None
    same_tokens(traces(engine.generate(prompt, GREEDY)), reference(prompt))
    for r in reps:  # each holder really held part of it and attended over it
        assert r.layer_batches > 0
    if peers is not None:
        # the layer batches went the way asked
        assert all((s.ipc is not None) == shared for s in peers._streams.values())
        assert engine.num_preemptions == 0
        assert settled_debts(peers.ledger) == {}
        assert all(r.holder.lent == 0 for r in reps)
        peers.close()


def test_eight_sequences_at_once_with_chunked_prefill_and_a_prefix_hit(
    tiny_model_dir, cluster, replicas, reference
):
    reps = [replicas(num_blocks=96) for _ in range(2)]
    shared = random_prompts(1, 256, 64, 64, seed=5)[0]  # 4 full blocks, cached after the first
    prompts = [shared + p for p in random_prompts(8, 256, 40, 160, seed=6)]
    engine, peers = decoder(tiny_model_dir, cluster, num_kv_blocks=16, max_num_batched_tokens=48)
    first = engine.generate(prompts[:1], GREEDY)[0]
    rest = engine.generate(prompts[1:], GREEDY)
    same_tokens(traces([first, *rest]), reference(prompts))
    assert any(c.num_cached_tokens >= 64 for c in rest)  # the shared prefix was a cache hit
    assert sum(r.layer_batches for r in reps) > 0
    engine.check_integrity()
    assert settled_debts(peers.ledger) == {}
    peers.close()


def test_smollm2_over_two_replicas_is_token_exact(smollm2_dir, cluster, replicas):
    """The real model (GQA 9/3 heads, 30 layers): a prompt over twice the decoder's pool."""
    started = [replicas(num_blocks=64, lend_fraction=8 / 64, model_dir=smollm2_dir) for _ in "ab"]
    prompt = random_prompts(1, 49152, 300, 300, seed=12)
    want = traces(make_engine(smollm2_dir, block_size=BS).generate(prompt, GREEDY))
    engine, peers = decoder(smollm2_dir, cluster, max_num_batched_tokens=128)
    same_tokens(traces(engine.generate(prompt, GREEDY)), want)
    assert all(s.layer_batches > 0 for s in started)  # 8 local + 8 + 4: three holders
    assert settled_debts(peers.ledger) == {}
    peers.close()


@pytest.mark.gpu
def test_gpu_decoder_and_replica_are_token_exact(tiny_model_dir, cluster, replicas):
    """On CUDA (float32, fused kernels, async scheduling): the decode kernel's log-sum-exp
    path and the replica's, against a local CUDA engine."""
    rep = replicas(num_blocks=64, device="cuda", dtype="float32")
    prompts = random_prompts(4, 256, 150, 220, seed=13)
    want = traces(
        make_engine(tiny_model_dir, block_size=BS, device="cuda", dtype="float32").generate(
            prompts, GREEDY
        )
    )
    engine, peers = decoder(
        tiny_model_dir, cluster, device="cuda", dtype="float32", max_num_batched_tokens=64
    )
    same_tokens(traces(engine.generate(prompts, GREEDY)), want)
    assert rep.layer_batches > 0
    assert settled_debts(peers.ledger) == {}
    peers.close()


@pytest.mark.gpu
def test_gpu_replica_process_over_cuda_ipc_is_token_exact(tiny_model_dir, cluster):
    """A replica in its own process on the same GPU, its lent blocks read and written in place
    (its pool mapped by the decoder), and again through layer batches in CUDA IPC buffers
    (gRPC and a local socket carry only control): tokens do not change either way."""
    proc = replica_process(tiny_model_dir, cluster, 64, device="cuda", dtype="float32")
    try:
        prompts = random_prompts(4, 256, 150, 220, seed=14)
        local = make_engine(tiny_model_dir, block_size=BS, device="cuda", dtype="float32")
        want = traces(local.generate(prompts, GREEDY))
        for in_place in (True, False):
            engine, peers = decoder(
                tiny_model_dir, cluster, device="cuda", dtype="float32",
                max_num_batched_tokens=64, borrower_id=f"decoder-{in_place}",
            )  # fmt: skip
            peers.in_place_ok = in_place
            same_tokens(traces(engine.generate(prompts, GREEDY)), want)
            assert any(s.ipc is not None for s in peers._streams.values())  # through IPC
            assert peers._links  # steps and layer batches over the local link
            assert bool(peers._pools) == in_place  # its pool mapped here, or not
            assert engine.runner.dist_graph_steps > 0  # split decode steps as CUDA graphs
            assert settled_debts(peers.ledger) == {}
            peers.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
