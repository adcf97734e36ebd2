"""Where the router sends a request: the pure decisions (router.placement), then the real pool
backend over real prefill and decode replicas registered in a real valkey."""

from __future__ import annotations

import asyncio
import random
import threading

import pytest

from kvstore.config import Membership
from kvstore.registry import list_replicas
from router.backend import PoolBackend
from router.config import ModelRoute, RouterConfig
from router.pd_client import PDClient
from router.placement import Candidate, PrefixAffinity, pick_decode, pick_prefill
from services.engine.block_hash import hash_blocks
from services.engine.sampling_params import SamplingParams
from tests.kv_helpers import wait_for
from tests.replica_helpers import decode_server, prefill_server

GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


# -- the decisions ------------------------------------------------------------------------------


def test_prefill_goes_to_the_longest_prefix_unless_its_queue_is_longer():
    a = Candidate("a", "A", prefix_blocks=0)
    b = Candidate("b", "B", prefix_blocks=6)
    c = Candidate("c", "C", prefix_blocks=5, outstanding_tokens=0)
    assert pick_prefill([a, b]).replica_id == "b"
    # Within one block of the best, the shorter queue wins: b has work outstanding, c none.
    b_busy = Candidate("b", "B", prefix_blocks=6, outstanding_tokens=900)
    assert pick_prefill([a, b_busy, c]).replica_id == "c"
    # Nothing cached anywhere: the fewest outstanding tokens, then the replica id.
    cold = [Candidate("b", "B", outstanding_tokens=10), Candidate("a", "A", outstanding_tokens=10)]
    assert pick_prefill(cold).replica_id == "a"
    assert pick_prefill([*cold, Candidate("z", "Z")]).replica_id == "z"


def test_decode_goes_to_the_least_loaded_unless_the_prefix_owner_is_close():
    idle = Candidate("d0", "A", free_blocks=100, total_blocks=100)
    half = Candidate("d1", "B", free_blocks=50, total_blocks=100, running=4)
    assert pick_decode([half, idle], None).replica_id == "d0"
    # The replica that served this prefix keeps it while within the slack of the least loaded
    # (its prefix cache likely holds the blocks); past it, load wins.
    near = Candidate("d1", "B", free_blocks=90, total_blocks=100, running=2)
    assert pick_decode([near, idle], "d1").replica_id == "d1"
    assert pick_decode([half, idle], "d1").replica_id == "d0"
    assert pick_decode([half, idle], "gone").replica_id == "d0"


def test_prefix_affinity_remembers_the_longest_known_prefix_lru_bounded():
    aff = PrefixAffinity(capacity=3)
    aff.record([b"1", b"2"], "d0")
    aff.record([b"1", b"2", b"3"], "d1")
    assert aff.lookup([b"1", b"2", b"3", b"4"]) == "d1"
    aff.record([b"9"], "d2")  # capacity 3: the least recently used id (b"1") goes
    assert aff.lookup([b"1"]) is None and aff.lookup([b"9"]) == "d2"


# -- the pool backend over real replicas -------------------------------------------------------


@pytest.fixture
def pools(tiny_model_dir, redis_url, namespace, loop_thread):
    """Two prefill and two decode replicas of the tiny model, registered under `namespace`."""
    servers = {}
    for rid in ("prefill-a", "prefill-b"):
        servers[rid] = prefill_server(tiny_model_dir, redis_url, namespace, replica_id=rid)
    for rid in ("decode-a", "decode-b"):
        servers[rid] = decode_server(tiny_model_dir, redis_url, namespace, replica_id=rid)
    for s in servers.values():
        loop_thread.run(s.start())
    wait_for(lambda: len(list_replicas(redis_url, "prefill", "tiny", namespace)) == 2, 30)
    wait_for(lambda: len(list_replicas(redis_url, "decode", "tiny", namespace)) == 2, 30)
    e = servers["prefill-a"].engine
    config = RouterConfig(
        models=(
            ModelRoute(name="tiny", model_dir=str(tiny_model_dir), model_id=e.model_id,
                       block_size=e.block_size, max_model_len=e.max_model_len),
        ),
        cluster=Membership(redis_url=redis_url, namespace=namespace),
        auth=False,
        refresh_s=0.05,
    )  # fmt: skip
    yield servers, config
    for s in servers.values():
        loop_thread.run(s.stop(drain_s=2))


def hold(server, loop_thread) -> threading.Event:
    """Stall a replica's engine thread (requests queue up behind it, as behind a long step)
    until the returned event is set."""
    gate = threading.Event()
    asyncio.run_coroutine_threadsafe(server.loop.call(lambda _: gate.wait(60)), loop_thread.loop)
    return gate


def holds_prompt(server, prompt: list[int]) -> bool:
    """The prefill replica's KV shard holds every full block of the prompt."""
    e = server.engine
    ids = hash_blocks(prompt, e.block_size, e.model_id)
    return len(server.kv.store.lookup(ids)) == len(ids)


async def run(backend: PoolBackend, prompt: list[int], rid: str):
    pieces = [p async for p in backend.generate("tiny", prompt, GREEDY, rid)]
    return [t for p in pieces for t in p.token_ids], pieces[0]


def test_prefill_prefers_the_shard_holding_the_prefix(pools, loop_thread):
    """A prompt whose prefix sits in prefill-b's shard goes to prefill-b, although prefill-a
    wins every tie (its id sorts first)."""
    servers, config = pools
    rng = random.Random(1)
    base = [rng.randrange(5, 500) for _ in range(64)]  # 4 full blocks
    longer = base + [rng.randrange(5, 500) for _ in range(20)]
    b = servers["prefill-b"]

    async def go():
        # The prefix lands on prefill-b only: straight there, not through the router.
        async with PDClient(servers["decode-a"].address, b.address, model="tiny") as c:
            await c.complete(base, GREEDY)
        backend = PoolBackend(config)
        try:
            cold_prompt = [rng.randrange(5, 500) for _ in range(40)]
            cold = await run(backend, cold_prompt, "cold")  # no prefix anywhere: the tie-break
            warm = await run(backend, longer, "warm")
        finally:
            await backend.close()
        return cold_prompt, cold, warm

    cold_prompt, _, (tokens, first) = asyncio.run(go())
    assert holds_prompt(servers["prefill-a"], cold_prompt)
    assert not holds_prompt(b, cold_prompt)
    assert holds_prompt(b, longer) and not holds_prompt(servers["prefill-a"], longer)
    assert len(tokens) == GREEDY.max_tokens and first.prefill_timings is not None


def test_a_busy_replica_is_passed_over_for_the_least_loaded(
    pools, loop_thread, redis_url, namespace
):
    """prefill-a and decode-a stall with a request queued on each: the next request, with no
    prefix cached anywhere, goes to prefill-b and decode-b; once released, both finish."""
    servers, config = pools
    rng = random.Random(2)
    p0, p1, p2 = ([rng.randrange(5, 500) for _ in range(48)] for _ in range(3))
    pa_gate = hold(servers["prefill-a"], loop_thread)
    da_gate = hold(servers["decode-a"], loop_thread)

    async def go():
        backend = PoolBackend(config)
        try:
            # decode-a: a request sent straight there, stalled while pulling its KV (which
            # counts as waiting in the registry's load).
            async with PDClient(servers["decode-a"].address, servers["prefill-b"].address) as c:
                queued_decode = asyncio.create_task(c.complete(p0, GREEDY))
                await asyncio.to_thread(
                    wait_for,
                    lambda: any(r.waiting for r in list_replicas(redis_url, "decode", "tiny",
                                                                 namespace)),
                    30,
                )  # fmt: skip
                # prefill-a (first in every tie): the router's own request waits there.
                queued_prefill = asyncio.create_task(run(backend, p1, "first"))
                await asyncio.to_thread(
                    wait_for, lambda: backend.outstanding_tokens("prefill-a") > 0, 30
                )
                second = await run(backend, p2, "second")
                pa_gate.set()
                da_gate.set()
                return second, await queued_prefill, await queued_decode
        finally:
            pa_gate.set()
            da_gate.set()
            await backend.close()

    (tokens, _), _, _ = asyncio.run(go())
    assert len(tokens) == GREEDY.max_tokens
    assert holds_prompt(servers["prefill-b"], p2) and not holds_prompt(servers["prefill-a"], p2)
    assert holds_prompt(servers["prefill-a"], p1)
    # decode-b pulled p2's blocks into its prefix cache; decode-a never saw p2.
    e = servers["decode-b"].engine
    ids = hash_blocks(p2, e.block_size, e.model_id)
    hits = {
        rid: loop_thread.run(servers[rid].loop.call(lambda eng: len(eng.pool.lookup(ids))))
        for rid in ("decode-a", "decode-b")
    }
    assert hits == {"decode-a": 0, "decode-b": len(ids)}


def test_registry_lists_where_a_replica_serves_its_metrics(redis_url, namespace):
    from kvstore.registry import register_replica

    cluster = Membership(redis_url=redis_url, namespace=namespace, heartbeat_s=0.25, ttl_s=1.5)
    load = {"running": 1, "waiting": 2, "free_blocks": 3, "total_blocks": 4}
    with_m = register_replica(cluster, "prefill", "p1", model="m", address="127.0.0.1:1",
                              load=lambda: load, metrics_address="127.0.0.1:2")  # fmt: skip
    without = register_replica(cluster, "prefill", "p2", model="m", address="127.0.0.1:3",
                               load=lambda: load)  # fmt: skip
    try:
        wait_for(lambda: len(list_replicas(redis_url, "prefill", "m", ns=namespace)) == 2, 10)
        got = {r.replica_id: r for r in list_replicas(redis_url, "prefill", "m", ns=namespace)}
        assert got["p1"].metrics_address == "127.0.0.1:2" and got["p1"].waiting == 2
        assert got["p2"].metrics_address == ""
    finally:
        with_m.close()
        without.close()
