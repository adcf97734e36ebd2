"""DistAttention and memory lending end to end: a decoder with a small KV pool borrows blocks
from real attention replicas (gRPC, Redis ledger), and its greedy tokens equal those of one
engine holding everything locally."""

from __future__ import annotations

import time

import grpc
import pytest

from kvstore.config import Membership
from kvstore.lending import Ledger
from protos.splitserve.v1 import attention_pb2 as pb
from protos.splitserve.v1 import attention_pb2_grpc as pb_grpc
from services.attention import AttentionServer
from services.attention_client import AttentionPeers, IpcSpec, layout_key
from services.config import AttentionConfig
from services.engine.config import EngineConfig
from services.engine.sampling_params import SamplingParams
from services.wire import tensor_to_pb
from tests.engine_helpers import make_engine, random_prompts

# logprobs=0: each token's log-probability too, so a numeric error shows even where a tiny
# random model repeats one token.
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=0)
BS = 16


@pytest.fixture
def cluster(redis_url, namespace):
    return Membership(redis_url=redis_url, namespace=namespace, heartbeat_s=0.25, ttl_s=1.5)


@pytest.fixture
def replicas(loop_thread, cluster, tiny_model_dir):
    """start(num_blocks, lend_fraction) -> a running attention replica; all stopped after."""
    started: list[AttentionServer] = []

    def start(num_blocks: int = 64, lend_fraction: float = 1.0, **engine) -> AttentionServer:
        cfg = AttentionConfig(
            name="tiny", model=tiny_model_dir, cluster=cluster, lend_fraction=lend_fraction,
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


def decoder(model_dir, cluster, num_kv_blocks=8, shared=True, **cfg):
    """An engine with a small pool that borrows through the ledger (as a decode replica);
    shared: layer batches through shared memory (else as bytes in the messages)."""
    e = make_engine(model_dir, num_kv_blocks=num_kv_blocks, block_size=BS, **cfg)
    ledger = Ledger(cluster.redis_url, cluster.namespace, cluster.ttl_s)
    mc = e.model_config
    ipc = IpcSpec(e.device, e.config.max_num_batched_tokens, mc.num_heads, mc.num_kv_heads,
                  mc.head_dim, e.dtype) if shared else None  # fmt: skip
    peers = AttentionPeers(
        ledger, "decoder-0", layout_key(e.model_id, e.kv_block_layout()), ipc=ipc
    )
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
            outs[out.request_id] += [(t.token_id, round(t.logprob, 4)) for t in out.logprobs]
        if between is not None:
            between(outs)
    assert not engine.has_unfinished(), "the requests did not finish in the step bound"
    return outs, errors


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """Greedy tokens of one engine holding every sequence locally."""
    engine = make_engine(tiny_model_dir, block_size=BS)
    cache: dict = {}

    def tokens(prompts: list[list[int]]) -> list[list[int]]:
        key = tuple(map(tuple, prompts))
        if key not in cache:
            cache[key] = [_trace(c) for c in engine.generate(prompts, GREEDY)]
        return cache[key]

    return tokens


def _trace(c) -> list[tuple[int, float]]:
    """A completion's tokens with their log-probabilities rounded to 1e-4."""
    return [(t.token_id, round(t.logprob, 4)) for t in c.logprobs]


def traces(completions) -> list[list[tuple[int, float]]]:
    return [_trace(c) for c in completions]


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
    assert traces(engine.generate(prompt, GREEDY)) == reference(prompt)
    for r in reps:  # each holder really held part of it and attended over it
        assert r.layer_batches > 0
    if peers is not None:  # the layer batches went the way asked
        assert all((s.ipc is not None) == shared for s in peers._streams.values())
    if peers is not None:
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
    assert traces([first, *rest]) == reference(prompts)
    assert any(c.num_cached_tokens >= 64 for c in rest)  # the shared prefix was a cache hit
    assert sum(r.layer_batches for r in reps) > 0
    engine.check_integrity()
    assert settled_debts(peers.ledger) == {}
    peers.close()


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
    assert [outs[r] for r in rids] == reference(prompts)
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
    assert traces(engine.generate(prompts, GREEDY)) == reference(prompts)
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
    assert outs["short"] == reference([short])[0]
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
    assert [outs[r] for r in rids] == reference(prompts)
    assert settled_debts(peers.ledger) == {}
    peers.close()


def test_smollm2_over_two_replicas_is_token_exact(smollm2_dir, cluster, loop_thread):
    """The real model (GQA 9/3 heads, 30 layers): a prompt over twice the decoder's pool."""
    from kvstore.lending import Ledger

    started = []
    for _ in range(2):
        cfg = AttentionConfig(
            name="smollm2", model=smollm2_dir, cluster=cluster, lend_fraction=8 / 64,
            engine=EngineConfig(num_kv_blocks=64, block_size=BS),
        )  # fmt: skip
        s = AttentionServer(cfg)
        loop_thread.run(s.start())
        started.append(s)
    prompt = random_prompts(1, 49152, 300, 300, seed=12)
    want = traces(make_engine(smollm2_dir, block_size=BS).generate(prompt, GREEDY))
    engine = make_engine(smollm2_dir, num_kv_blocks=8, block_size=BS, max_num_batched_tokens=128)
    ledger = Ledger(cluster.redis_url, cluster.namespace, cluster.ttl_s)
    peers = AttentionPeers(
        ledger, "decoder-s", layout_key(engine.model_id, engine.kv_block_layout())
    )
    engine.attach_remote_kv(peers)
    assert traces(engine.generate(prompt, GREEDY)) == want
    assert all(s.layer_batches > 0 for s in started)  # 8 local + 8 + 4: three holders
    assert settled_debts(ledger) == {}
    peers.close()
    for s in started:
        loop_thread.run(s.stop(drain_s=0.5))


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
    assert traces(engine.generate(prompts, GREEDY)) == want
    assert rep.layer_batches > 0
    assert settled_debts(peers.ledger) == {}
    peers.close()


@pytest.mark.gpu
def test_gpu_replica_process_over_cuda_ipc_is_token_exact(tiny_model_dir, cluster):
    """A replica in its own process on the same GPU: layer batches travel through CUDA IPC
    buffers and events (gRPC carries only control), and tokens do not change."""
    import os
    import subprocess
    import sys

    from services.attention_client import IpcSpec

    proc = subprocess.Popen(
        [sys.executable, "-m", "services.attention", "--model", str(tiny_model_dir), "--redis",
         cluster.redis_url, "--namespace", cluster.namespace, "--num-kv-blocks", "64",
         "--device", "cuda", "--dtype", "float32"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p)},
    )  # fmt: skip
    try:
        assert proc.stdout.readline().strip()
        prompts = random_prompts(4, 256, 150, 220, seed=14)
        local = make_engine(tiny_model_dir, block_size=BS, device="cuda", dtype="float32")
        want = traces(local.generate(prompts, GREEDY))
        engine = make_engine(tiny_model_dir, num_kv_blocks=8, block_size=BS, device="cuda",
                             dtype="float32", max_num_batched_tokens=64)  # fmt: skip
        mc = engine.model_config
        ledger = Ledger(cluster.redis_url, cluster.namespace, cluster.ttl_s)
        ipc = IpcSpec("cuda", 64, mc.num_heads, mc.num_kv_heads, mc.head_dim, engine.dtype)
        peers = AttentionPeers(
            ledger, "decoder-ipc", layout_key(engine.model_id, engine.kv_block_layout()), ipc=ipc
        )
        engine.attach_remote_kv(peers)
        assert traces(engine.generate(prompts, GREEDY)) == want
        assert any(s.ipc is not None for s in peers._streams.values())  # it went through IPC
        assert settled_debts(ledger) == {}
        peers.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _replica_process(model_dir, cluster, num_blocks: int, device: str = "cpu"):
    """An attention replica in its own process (python -m services.attention)."""
    import os
    import subprocess
    import sys

    path = os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.attention", "--model", str(model_dir), "--redis",
         cluster.redis_url, "--namespace", cluster.namespace, "--num-kv-blocks",
         str(num_blocks), "--device", device, "--cpu-threads", "1"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": path},
    )  # fmt: skip
    assert proc.stdout.readline().strip(), "the replica did not start"
    return proc


def test_sigkilled_replica_process_is_recomputed_token_exact(
    tiny_model_dir, cluster, replicas, reference
):
    """The real fault: a replica process killed with SIGKILL mid-sequence."""
    import signal

    proc = _replica_process(tiny_model_dir, cluster, 64)
    survivor = replicas(num_blocks=64)
    try:
        prompts = random_prompts(2, 256, 220, 260, seed=15)
        engine, peers = decoder(tiny_model_dir, cluster, max_num_batched_tokens=64)
        rids = ["a", "b"]
        killed = False

        def kill(outs):
            nonlocal killed
            on_victim = any(s.holder_id != survivor.holder_id for s in peers._streams.values())
            if not killed and on_victim and sum(map(len, outs.values())) >= 4:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=30)
                killed = True

        outs, errors = drive(
            engine, {r: (p, GREEDY) for r, p in zip(rids, prompts, strict=True)}, kill
        )
        assert not errors
        assert killed
        assert [outs[r] for r in rids] == reference(prompts)
        engine.check_integrity()
        peers.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


async def _collect(loop, rid, prompt, params) -> list:
    out = []
    async for o in loop.generate(rid, prompt, params):
        out.extend((t.token_id, round(t.logprob, 4)) for t in o.logprobs)
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

        own = random_prompts(3, 256, 180, 200, seed=17)  # B's own work: 13 blocks each
        traced, errors = drive(engine, {"long": (long_prompt, slow)}, busy_b)
        assert not errors
        outs = traced["long"]
        assert b_jobs is not None, "A never borrowed from B"
        assert outs == want_long
        assert [j.result(timeout=300) for j in b_jobs] == reference(own)
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
    fresh_redis, namespace, loop_thread, tiny_model_dir, reference
):
    """Redis restarts (empty) while a sequence runs over borrowed blocks: lending goes on over
    the open streams, creditors put their entries and debts back, the tokens do not change and
    the ledger ends square."""
    cl = Membership(redis_url=fresh_redis.url, namespace=namespace, heartbeat_s=0.25, ttl_s=1.5)
    reps = []
    for _ in range(2):
        s = AttentionServer(AttentionConfig(
            name="tiny", model=tiny_model_dir, cluster=cl,
            engine=EngineConfig(num_kv_blocks=64, block_size=BS),
        ))  # fmt: skip
        loop_thread.run(s.start())
        reps.append(s)
    try:
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
        assert [outs[r] for r in rids] == reference(prompts)
        # The creditors are back in the (new) ledger, and nobody owes anything once done.
        deadline = time.monotonic() + 20
        while len(peers.ledger.creditors()) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert {c.creditor_id for c in peers.ledger.creditors()} == {r.holder_id for r in reps}
        assert settled_debts(peers.ledger) == {}
        assert all(r.holder.lent == 0 for r in reps)
        peers.close()
    finally:
        for s in reps:
            loop_thread.run(s.stop(drain_s=0.5))
