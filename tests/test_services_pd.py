"""Prefill -> KV store -> decode over real gRPC servers, a real valkey, on loopback."""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import sys

import grpc
import pytest

from kvstore.registry import list_replicas
from protos.splitserve.v1 import decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from router.pd_client import PDClient
from rpc.sampling import sampling_to_pb
from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.engine.sampling_params import SamplingParams
from tests.engine_helpers import random_prompts
from tests.kv_helpers import wait_for
from tests.replica_helpers import decode_server, prefill_server

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def engine(model_dir, **kw) -> LLMEngine:
    kw.setdefault("num_kv_blocks", 512)
    return LLMEngine(model_dir, EngineConfig(**kw), seed=0)


@pytest.fixture
def pd(tiny_model_dir, redis_url, namespace, loop_thread):
    """A prefill and a decode replica of the tiny model."""
    p = prefill_server(tiny_model_dir, redis_url, namespace)
    d = decode_server(tiny_model_dir, redis_url, namespace)
    loop_thread.run(p.start())
    loop_thread.run(d.start())
    yield p, d
    loop_thread.run(d.stop(drain_s=2))
    loop_thread.run(p.stop(drain_s=2))


def shared_prefix_prompts(vocab: int, n: int = 24) -> list[list[int]]:
    rng = random.Random(7)
    base = [rng.randrange(5, vocab) for _ in range(40)]
    out = random_prompts(n // 2, vocab, 17, 120, seed=11)
    out += [base[: rng.randint(16, 40)] + [rng.randrange(5, vocab) for _ in range(rng.randint(
        1, 50))] for _ in range(n - len(out))]  # fmt: skip
    return out


def no_leaks(loop_thread, *servers) -> None:
    for s in servers:
        usage = loop_thread.run(s.loop.call(lambda e: e.check_integrity()))
        assert usage.in_use == 0, (type(s).__name__, usage)


def test_disaggregated_greedy_equals_single_engine_concurrently(tiny_model_dir, pd, loop_thread):
    p, d = pd
    prompts = shared_prefix_prompts(engine(tiny_model_dir).model_config.vocab_size)
    ref = [c.token_ids for c in engine(tiny_model_dir).generate(prompts, GREEDY)]
    seeded = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=5, ignore_eos=True)
    ref_seeded = [c.token_ids for c in engine(tiny_model_dir).generate(prompts[:4], seeded)]

    async def go():
        async with PDClient(d.address, p.address, model="tiny") as c:
            greedy = await asyncio.gather(*(c.complete(x, GREEDY) for x in prompts))
            sampled = await asyncio.gather(*(c.complete(x, seeded) for x in prompts[:4]))
            return greedy, sampled

    outs, sampled = asyncio.run(go())
    assert [o.token_ids for o in outs] == ref
    assert [o.token_ids for o in sampled] == ref_seeded
    assert all(o.finish_reason == "length" and o.usage.completion_tokens == 24 for o in outs)
    assert sum(o.decode_timings.blocks_pulled for o in outs) > 0
    no_leaks(loop_thread, p, d)
    assert p.kv.store.stats().pinned_blocks == 0  # decode released every pin


def test_shared_prefix_pulls_only_new_blocks(tiny_model_dir, pd, loop_thread):
    p, d = pd
    e = engine(tiny_model_dir)
    rng = random.Random(3)
    first = [rng.randrange(5, e.model_config.vocab_size) for _ in range(64)]  # 4 full blocks
    second = first + [rng.randrange(5, e.model_config.vocab_size) for _ in range(40)]
    ref = [c.token_ids for c in e.generate([second], GREEDY)]
    bs = e.block_size
    cfg = e.model_config
    block_bytes = cfg.num_layers * 2 * bs * cfg.num_kv_heads * cfg.head_dim * 4

    async def go():
        async with PDClient(d.address, p.address) as c:
            a = await c.complete(first, GREEDY)
            b = await c.complete(second, GREEDY)
            return a, b

    a, b = asyncio.run(go())
    assert a.decode_timings.blocks_pulled == 4 and a.decode_timings.bytes_pulled == 4 * block_bytes
    # The decode's prefix cache holds the first request's 4 imported blocks: only the rest move.
    new_full, tail = divmod(len(second), bs)
    expect_blocks = new_full - 4 + (1 if tail else 0)
    assert b.decode_timings.blocks_pulled == expect_blocks
    assert b.decode_timings.bytes_pulled == (new_full - 4) * block_bytes + (
        tail * block_bytes // bs
    )
    assert b.token_ids == ref[0]
    no_leaks(loop_thread, p, d)


def test_prefill_killed_after_answering_decode_recomputes(tiny_model_dir, redis_url, namespace,
                                                          loop_thread):  # fmt: skip
    d = decode_server(tiny_model_dir, redis_url, namespace)
    loop_thread.run(d.start())
    cmd = [sys.executable, "-m", "splitserve.cli", "serve", "prefill", "--model",
           str(tiny_model_dir), "--redis", redis_url, "--namespace", namespace,
           "--num-kv-blocks", "256"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        addr = proc.stdout.readline().strip()
        assert addr, proc.stderr.read()
        prompts = random_prompts(3, 500, 40, 90, seed=21)
        ref = [c.token_ids for c in engine(tiny_model_dir).generate(prompts, GREEDY)]

        async def go():
            ch = grpc.aio.insecure_channel(addr)
            pres = []
            for i, x in enumerate(prompts):
                pres.append(await prefill_pb2_grpc.PrefillStub(ch).Prefill(
                    prefill_pb2.PrefillRequest(request_id=f"k{i}", prompt_token_ids=x,
                                               sampling=sampling_to_pb(GREEDY))))  # fmt: skip
            await ch.close()
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            outs = []
            dch = grpc.aio.insecure_channel(d.address)
            for i, (x, pre) in enumerate(zip(prompts, pres, strict=True)):
                req = decode_pb2.DecodeRequest(
                    request_id=f"k{i}", prompt_token_ids=x, sampling=sampling_to_pb(GREEDY),
                    first_token_id=pre.first_token_id, blocks=pre.blocks, pin_id=pre.pin_id,
                    pin_holder_address=pre.holder_address,
                )  # fmt: skip
                toks, timings = [pre.first_token_id], None
                async for m in decode_pb2_grpc.DecodeStub(dch).Decode(req, timeout=60):
                    toks += m.token_ids
                    timings = timings or (m.timings if m.HasField("timings") else None)
                outs.append((toks, timings))
            await dch.close()
            return outs

        outs = asyncio.run(go())
        assert [t for t, _ in outs] == ref
        assert all(tm.blocks_recomputed > 0 and tm.blocks_pulled == 0 for _, tm in outs)
        no_leaks(loop_thread, d)
    finally:
        proc.kill()
        proc.wait()
        loop_thread.run(d.stop(drain_s=2))


def test_cancel_mid_stream_leaks_nothing(tiny_model_dir, pd, loop_thread):
    p, d = pd
    long = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)

    async def go():
        async with PDClient(d.address, p.address) as c:
            n = 0
            gen = c.generate(list(range(5, 60)), long)
            async for piece in gen:
                n += len(piece.token_ids)
                if n >= 5:
                    break
            await gen.aclose()
            await asyncio.sleep(0.3)
            return n

    assert asyncio.run(go()) >= 5

    def settled() -> bool:
        busy = loop_thread.run(d.loop.call(lambda e: e.num_running + e.num_waiting))
        return busy == 0 and p.kv.store.stats().pinned_blocks == 0

    wait_for(settled, timeout=60)  # a bound, not a measure: it returns once settled
    no_leaks(loop_thread, p, d)


def test_100_concurrent_requests_finish(tiny_model_dir, pd):
    p, d = pd
    prompts = random_prompts(100, 500, 3, 60, seed=99)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)

    async def go():
        async with PDClient(d.address, p.address) as c:
            return await asyncio.wait_for(
                asyncio.gather(*(c.complete(x, params) for x in prompts)), 240
            )

    outs = asyncio.run(go())
    assert all(len(o.token_ids) == 8 and o.finish_reason == "length" for o in outs)


def test_colocated_equals_single_engine(tiny_model_dir, loop_thread):
    d = decode_server(tiny_model_dir, colocated=True)
    loop_thread.run(d.start())
    try:
        prompts = random_prompts(6, 500, 1, 70, seed=4)
        ref = [c.token_ids for c in engine(tiny_model_dir).generate(prompts, GREEDY)]

        async def go():
            async with PDClient(d.address) as c:
                return await asyncio.gather(*(c.complete(x, GREEDY) for x in prompts))

        assert [o.token_ids for o in asyncio.run(go())] == ref
    finally:
        loop_thread.run(d.stop(drain_s=2))


def _code(coro) -> tuple[grpc.StatusCode | None, str]:
    async def run():
        try:
            await coro()
        except grpc.aio.AioRpcError as e:
            return e.code(), e.details()
        return None, ""

    return asyncio.run(run())


def test_bad_inputs_get_their_codes(tiny_model_dir, pd, loop_thread):
    p, d = pd

    async def prefill(**kw):
        async with grpc.aio.insecure_channel(p.address) as ch:
            kw.setdefault("prompt_token_ids", [5, 6, 7])
            kw.setdefault("sampling", sampling_to_pb(GREEDY))
            await prefill_pb2_grpc.PrefillStub(ch).Prefill(prefill_pb2.PrefillRequest(**kw))

    async def decode(**kw):
        async with grpc.aio.insecure_channel(d.address) as ch:
            kw.setdefault("prompt_token_ids", [5, 6, 7])
            kw.setdefault("sampling", sampling_to_pb(GREEDY))
            async for _ in decode_pb2_grpc.DecodeStub(ch).Decode(decode_pb2.DecodeRequest(**kw)):
                pass

    inv = grpc.StatusCode.INVALID_ARGUMENT
    code, msg = _code(lambda: prefill(prompt_token_ids=[5, 10**6]))
    assert code == inv and "outside the vocabulary" in msg
    bad = sampling_to_pb(GREEDY)
    bad.temperature = -1
    code, msg = _code(lambda: prefill(sampling=bad))
    assert code == inv and "temperature" in msg
    code, msg = _code(lambda: prefill(model="gpt-9"))
    assert code == inv and "unknown model" in msg
    code, msg = _code(lambda: prefill(prompt_token_ids=[]))
    assert code == inv and "empty" in msg
    code, msg = _code(lambda: decode())  # no first token on a decode-only server
    assert code == inv and "first_token_id" in msg
    code, msg = _code(lambda: decode(first_token_id=10**6))
    assert code == inv and "vocabulary" in msg

    # Queue full: a decode replica that admits one waiting request at most.
    small = decode_server(tiny_model_dir, engine={"max_num_seqs": 1}, colocated=True,
                          max_waiting=1)  # fmt: skip
    loop_thread.run(small.start())
    try:
        many = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)

        async def flood():
            async with PDClient(small.address) as c:
                res = await asyncio.gather(
                    *(c.complete([5, 6, 7 + i], many) for i in range(6)), return_exceptions=True
                )
            return [r.code() for r in res if isinstance(r, grpc.aio.AioRpcError)]

        codes = asyncio.run(flood())
        assert codes and set(codes) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    finally:
        loop_thread.run(small.stop(drain_s=10))

    # Draining: new work is refused with UNAVAILABLE.
    loop_thread.run(p.app.drain(0.1))
    code, msg = _code(lambda: prefill())
    assert code == grpc.StatusCode.UNAVAILABLE and "draining" in msg
    no_leaks(loop_thread, d)


def test_registry_health_and_reflection(pd, redis_url, namespace):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    p, d = pd
    pre = list_replicas(redis_url, "prefill", "tiny", ns=namespace)
    dec = list_replicas(redis_url, "decode", "tiny", ns=namespace)
    assert [r.address for r in pre] == [p.address] and [r.address for r in dec] == [d.address]
    assert pre[0].total_blocks == 512 and pre[0].holder_id == p.replica_id

    async def health(addr, svc):
        async with grpc.aio.insecure_channel(addr) as ch:
            r = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(
                service=svc))  # fmt: skip
            return r.status

    serving = health_pb2.HealthCheckResponse.SERVING
    assert asyncio.run(health(p.address, "splitserve.v1.Prefill")) == serving
    assert asyncio.run(health(p.address, "splitserve.v1.KVStore")) == serving
    assert asyncio.run(health(d.address, "splitserve.v1.Decode")) == serving


def test_sigterm_drains_a_standalone_decode_server(tiny_model_dir, redis_url, namespace):
    cmd = [sys.executable, "-m", "splitserve.cli", "serve", "colocated", "--model",
           str(tiny_model_dir), "--redis", redis_url, "--namespace", namespace,
           "--num-kv-blocks", "128"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        addr = proc.stdout.readline().strip()
        assert addr, proc.stderr.read()
        params = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)

        async def go():
            async with PDClient(addr) as c:
                tokens: list[int] = []
                async for piece in c.generate([5, 6, 7, 8], params):
                    if not tokens:  # in flight for sure once a token came back: now stop it
                        proc.send_signal(signal.SIGTERM)
                    tokens += piece.token_ids
                return tokens

        assert len(asyncio.run(go())) == 60  # the in-flight request still finishes
        assert proc.wait(30) == 0
        assert not list_replicas(redis_url, "colocated", ns=namespace)
    finally:
        proc.kill()


@pytest.mark.parametrize("mode", ["recompute", "fastswitch"])
def test_preempted_decode_fetches_prompt_blocks_from_the_store(
    tiny_model_dir, redis_url, namespace, loop_thread, mode
):
    """A decode replica too small for its batch preempts; the prompt blocks it pulled from the
    store come back from the store (its KV tier) rather than being recomputed or swapped. The
    tokens are those of one engine."""
    small = {"num_kv_blocks": 24, "max_num_batched_tokens": 64, "preemption_mode": mode}
    p = prefill_server(tiny_model_dir, redis_url, namespace)
    d = decode_server(tiny_model_dir, redis_url, namespace, engine=small)
    loop_thread.run(p.start())
    loop_thread.run(d.start())
    try:
        # Each request outgrows half the pool (up to 15 blocks of 24) and decodes for 120
        # steps, while all ten arrive within one prefill batch's time: they overlap, and
        # preempt each other however slow the machine.
        prompts = random_prompts(10, 2048, 64, 120, seed=21)
        long = SamplingParams(max_tokens=120, temperature=0.0, ignore_eos=True)
        ref = [c.token_ids for c in engine(tiny_model_dir).generate(prompts, long)]

        async def go():
            async with PDClient(d.address, p.address, model="tiny") as c:
                return await asyncio.gather(*(c.complete(x, long) for x in prompts))

        outs = asyncio.run(go())
        assert [o.token_ids for o in outs] == ref
        sched = d.engine.scheduler
        assert d.engine.num_preemptions > 0
        assert sched.tier_blocks_fetched > 0, (sched.tier_blocks_fetched, sched.tier_blocks_missed)
        if mode == "fastswitch":
            assert sched.swap.blocks_in_tier > 0
        no_leaks(loop_thread, p, d)
    finally:
        loop_thread.run(d.stop(drain_s=2))
        loop_thread.run(p.stop(drain_s=2))
