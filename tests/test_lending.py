"""Memory lending and its faults, end to end: creditors that refuse, die, restart Redis under
them or want their blocks back; decode replicas that lend; bad requests to the service. The
tokens never change and the ledger always ends square."""

from __future__ import annotations

import time

import grpc

from kvstore.config import Membership
from protos.splitserve.v1 import attention_pb2 as pb
from protos.splitserve.v1 import attention_pb2_grpc as pb_grpc
from services.wire import tensor_to_pb
from tests.dist_helpers import (
    BS,
    GREEDY,
    decoder,
    drive,
    replica_process,
    same_tokens,
    settled_debts,
    trace,
    traces,
)
from tests.engine_helpers import make_engine, random_prompts


def test_killed_attention_replica_is_recomputed_token_exact(
    loop_thread, tiny_model_dir, cluster, replicas, reference
):
    """A replica dies mid-sequence: the sequences that had blocks there start over from their
    tokens (borrowing from the survivor) and the tokens do not change."""
    victim = replicas(num_blocks=64)
    replicas(num_blocks=64)
    prompts = random_prompts(3, 256, 200, 260, seed=7)
    engine, peers = decoder(tiny_model_dir, cluster, max_num_batched_tokens=64)
    rids = [f"r{i}" for i in range(len(prompts))]
    killed = False

    def kill(outs):
        nonlocal killed
        if not killed and victim.layer_batches > 0 and sum(map(len, outs.values())) >= 6:
            loop_thread.run(victim.app.server.stop(0))  # abrupt: streams break mid-flight
            victim.killed = killed = True

    outs, errors = drive(engine, {r: (p, GREEDY) for r, p in zip(rids, prompts, strict=True)}, kill)
    assert not errors
    assert killed
    same_tokens([outs[r] for r in rids], reference(prompts))
    assert engine.num_preemptions > 0  # the lost blocks were recomputed
    engine.check_integrity()
    peers.close()


def test_refusing_creditor_is_skipped_then_preemption(tiny_model_dir, cluster, replicas, reference):
    """A creditor at its cap refuses and the next one lends; when none can, the scheduler
    preempts (recompute) and still produces the same tokens."""
    replicas(num_blocks=64, lend_fraction=0.0)  # lends nothing
    lender = replicas(num_blocks=64, lend_fraction=20 / 64)
    prompts = random_prompts(4, 256, 150, 200, seed=8)
    engine, peers = decoder(tiny_model_dir, cluster, max_num_batched_tokens=64)
    same_tokens(traces(engine.generate(prompts, GREEDY)), reference(prompts))
    assert lender.layer_batches > 0
    assert engine.num_preemptions > 0
    assert settled_debts(peers.ledger) == {}
    peers.close()


def test_too_long_without_creditors_fails_cleanly(tiny_model_dir, cluster, reference):
    """No creditor and a sequence that can never fit the local pool: it ends with an error,
    and the other request on the engine is unharmed."""
    engine, peers = decoder(tiny_model_dir, cluster, num_kv_blocks=8)
    short, long_ = random_prompts(1, 256, 20, 20, seed=9)[0], random_prompts(1, 256, 200, 200)[0]
    outs, errors = drive(engine, {"short": (short, GREEDY), "long": (long_, GREEDY)})
    assert "long" in errors and "KV blocks" in errors["long"]
    same_tokens([outs["short"]], reference([short]))
    engine.check_integrity()
    peers.close()


def _stream(address: str):
    channel = grpc.insecure_channel(address)
    return channel, pb_grpc.AttentionStub(channel)


def test_bad_requests_get_their_own_codes_and_harm_nothing(tiny_model_dir, replicas):
    rep = replicas(num_blocks=16)
    cfg = rep.holder.cfg
    channel, stub = _stream(rep.address)

    def layer(nq: int, nw: int, heads: int = cfg.num_heads, layer_no: int = 0):
        import torch

        msg = pb.LayerBatch(layer=layer_no)
        tensor_to_pb(torch.randn(nq, heads, cfg.head_dim), msg.q)
        tensor_to_pb(torch.randn(nw, cfg.num_kv_heads, cfg.head_dim), msg.k)
        tensor_to_pb(torch.randn(nw, cfg.num_kv_heads, cfg.head_dim), msg.v)
        return msg

    reqs = [
        pb.AttentionRequest(id=1, borrow=pb.Borrow(seq_id="a", num_blocks=1)),  # before hello
        pb.AttentionRequest(id=2, hello=pb.Hello(borrower_id="b", layout="other")),
        pb.AttentionRequest(id=3, hello=pb.Hello(borrower_id="b", layout=rep.layout)),
        pb.AttentionRequest(id=4, borrow=pb.Borrow(seq_id="good", first_block=0, num_blocks=2)),
        pb.AttentionRequest(id=5, borrow=pb.Borrow(seq_id="big", num_blocks=999)),
        pb.AttentionRequest(
            id=6, step=pb.StepBegin(seqs=[pb.SeqSlice(seq_id="nope", q_start=0, num_q=1)])
        ),
        pb.AttentionRequest(
            id=7,
            step=pb.StepBegin(
                seqs=[pb.SeqSlice(seq_id="good", q_start=0, num_q=3, write_start=0, num_write=3)]
            ),
        ),
        pb.AttentionRequest(id=8, layer=layer(3, 2)),  # k/v rows short
        pb.AttentionRequest(id=9, layer=layer(3, 3, heads=cfg.num_heads + 1)),  # wrong heads
        pb.AttentionRequest(id=10, layer=layer(3, 3, layer_no=cfg.num_layers)),  # no such layer
        pb.AttentionRequest(id=11, layer=layer(3, 3)),  # fine, after all of the above
    ]
    resps = {r.id: r for r in stub.Session(iter(reqs), timeout=60)}
    code = {i: grpc.StatusCode(next(c for c in grpc.StatusCode if c.value[0] == r.code))
            for i, r in resps.items()}  # fmt: skip
    assert code[1] == grpc.StatusCode.FAILED_PRECONDITION
    assert code[2] == grpc.StatusCode.FAILED_PRECONDITION
    assert code[3] == code[4] == code[7] == code[11] == grpc.StatusCode.OK
    assert code[5] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert code[6] == grpc.StatusCode.NOT_FOUND
    assert code[8] == code[9] == code[10] == grpc.StatusCode.INVALID_ARGUMENT
    assert tuple(resps[11].layer.out.layout.shape) == (3, cfg.num_heads, cfg.head_dim)
    channel.close()
    # The stream ended: what "b" borrowed is freed.
    deadline = time.monotonic() + 20
    while rep.holder.lent and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rep.holder.lent == 0


def test_creditor_takes_its_memory_back(loop_thread, tiny_model_dir, cluster, replicas, reference):
    """Reclaim: the creditor lowers its cap and the borrower gives the blocks back (its
    sequences recompute, borrowing from the other creditor); tokens do not change. Mid-run the
    ledger matches what the borrower thinks it owes."""
    first = replicas(num_blocks=64)
    replicas(num_blocks=64)
    prompts = random_prompts(3, 256, 200, 260, seed=11)
    engine, peers = decoder(tiny_model_dir, cluster, max_num_batched_tokens=64)
    rids = [f"r{i}" for i in range(len(prompts))]
    asked = None

    def reclaim(outs):
        nonlocal asked
        if asked is None and first.holder.lent > 0 and sum(map(len, outs.values())) >= 3:
            debts = peers.ledger.debts()  # lent == borrowed, creditor by creditor
            owed = {c: sum(d.values()) for c, d in debts.items() if d}
            assert owed == peers.borrowed()
            stub = pb_grpc.AttentionStub(grpc.insecure_channel(first.address))
            asked = stub.Reclaim(pb.ReclaimRequest(keep_lent=0), timeout=30).asked

    outs, _ = drive(engine, {r: (p, GREEDY) for r, p in zip(rids, prompts, strict=True)}, reclaim)
    assert asked
    assert first.holder.lent == 0 and first.holder.lend_cap == 0
    same_tokens([outs[r] for r in rids], reference(prompts))
    assert settled_debts(peers.ledger) == {}
    peers.close()


def test_lending_metrics_name_the_peers(tiny_model_dir, cluster, replicas):
    from prometheus_client import generate_latest

    rep = replicas(num_blocks=32)
    _, peers = decoder(tiny_model_dir, cluster)
    seg = peers.borrow("s1", 0, 3)
    assert seg is not None and seg.holder_id == rep.holder_id
    text = generate_latest(rep.metrics.registry).decode()
    assert 'splitserve:kv_blocks_lent{model="tiny",peer="decoder-0",role="attention"} 3.0' in text
    assert peers.borrowed() == {rep.holder_id: 3}
    peers.release("s1")
    assert settled_debts(peers.ledger) == {}
    peers.close()


def test_sigkilled_replica_process_is_recomputed_token_exact(
    tiny_model_dir, cluster, replicas, reference
):
    """The real fault: a replica process killed with SIGKILL mid-sequence."""
    import signal

    proc = replica_process(tiny_model_dir, cluster, 64)
    survivor = replicas(num_blocks=64)
    try:
        prompts = random_prompts(2, 256, 220, 260, seed=15)
        engine, peers = decoder(tiny_model_dir, cluster, max_num_batched_tokens=64)
        rids = ["a", "b"]
        killed = False

        def kill(outs):
            nonlocal killed
            on_victim = any(s.name != survivor.holder_id for s in peers._streams.values())
            if not killed and on_victim and sum(map(len, outs.values())) >= 4:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=30)
                killed = True

        outs, errors = drive(
            engine, {r: (p, GREEDY) for r, p in zip(rids, prompts, strict=True)}, kill
        )
        assert not errors
        assert killed
        same_tokens([outs[r] for r in rids], reference(prompts))
        engine.check_integrity()
        peers.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


async def _collect(loop, rid, prompt, params) -> list:
    out = []
    async for o in loop.generate(rid, prompt, params):
        out += trace(o.logprobs)
    return out


def test_a_decode_replica_lends_free_blocks_and_takes_them_back(
    loop_thread, tiny_model_dir, cluster, replicas, reference
):
    """Decode replica B lends the free blocks of its own engine's pool to A's long sequence.
    When B's own requests need them, B asks for them back: A recomputes that sequence with
    blocks from the attention replica, and every token matches."""
    import asyncio
    import dataclasses

    from tests.replica_helpers import decode_server

    fallback = replicas(num_blocks=64, lend_fraction=30 / 64)
    b = decode_server(
        tiny_model_dir, cluster.redis_url, cluster.namespace, colocated=True,
        lend_fraction=1.0, engine={"num_kv_blocks": 48, "block_size": BS,
                                   "max_num_batched_tokens": 64},
    )  # fmt: skip
    loop_thread.run(b.start())
    try:
        engine, peers = decoder(tiny_model_dir, cluster, max_num_batched_tokens=64)
        long_prompt = random_prompts(1, 256, 300, 300, seed=16)[0]
        # Long enough to be still running when B's own work arrives.
        slow = dataclasses.replace(GREEDY, max_tokens=160)
        local = make_engine(tiny_model_dir, block_size=BS)
        want_long = traces(local.generate([long_prompt], slow))[0]
        b_jobs = None

        def busy_b(outs):
            nonlocal b_jobs
            if b_jobs is None and b.lender.holder.lent >= 4:  # A's tail is on B: now B is busy
                b_jobs = [
                    asyncio.run_coroutine_threadsafe(
                        _collect(b.loop, f"own{i}", p, GREEDY), loop_thread.loop
                    )
                    for i, p in enumerate(own)
                ]
                # A waits here until B, short of blocks for its own work, has asked for A's
                # back (or B is done): that B needs them while A's sequence is still on B must
                # not depend on which of the two runs faster on a loaded machine.
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline and not all(j.done() for j in b_jobs):
                    if any(sess.reclaim for sess in list(b.lender._sessions.values())):
                        break
                    time.sleep(0.01)

        # B's own work: 12-13 blocks each, 16-17 once answered: four need more than B's 48
        own = random_prompts(4, 256, 180, 200, seed=17)
        traced, errors = drive(engine, {"long": (long_prompt, slow)}, busy_b)
        assert not errors
        outs = traced["long"]
        assert b_jobs is not None, "A never borrowed from B"
        same_tokens([outs], [want_long])
        same_tokens([j.result(timeout=300) for j in b_jobs], reference(own))
        assert engine.num_preemptions > 0  # B took its blocks back
        assert fallback.layer_batches > 0  # and A went on with the attention replica's
        peers.close()
        deadline = time.monotonic() + 20
        while b.lender.holder.lent and time.monotonic() < deadline:
            time.sleep(0.05)
        assert b.lender.holder.lent == 0
        loop_thread.run(b.loop.call(lambda e: e.check_integrity()))
    finally:
        loop_thread.run(b.stop(drain_s=5))


def test_redis_restart_mid_sequence_loses_nothing(
    fresh_redis, namespace, replicas, tiny_model_dir, reference
):
    """Redis restarts (empty) while a sequence runs over borrowed blocks: lending goes on over
    the open streams, creditors put their entries and debts back, the tokens do not change and
    the ledger ends square."""
    cl = Membership(redis_url=fresh_redis.url, namespace=namespace, heartbeat_s=0.25, ttl_s=1.5)
    reps = [replicas(num_blocks=64, on=cl) for _ in range(2)]
    prompts = random_prompts(2, 256, 220, 260, seed=18)
    engine, peers = decoder(tiny_model_dir, cl, max_num_batched_tokens=64)
    restarted = False

    def restart(outs):
        nonlocal restarted
        if not restarted and sum(map(len, outs.values())) >= 4:
            fresh_redis.restart()
            restarted = True

    rids = ["a", "b"]
    outs, errors = drive(
        engine, {r: (p, GREEDY) for r, p in zip(rids, prompts, strict=True)}, restart
    )
    assert restarted and not errors
    same_tokens([outs[r] for r in rids], reference(prompts))
    # The creditors are back in the (new) ledger, and nobody owes anything once done.
    deadline = time.monotonic() + 20
    while len(peers.ledger.creditors()) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert {c.creditor_id for c in peers.ledger.creditors()} == {r.holder_id for r in reps}
    assert settled_debts(peers.ledger) == {}
    assert all(r.holder.lent == 0 for r in reps)
    peers.close()
