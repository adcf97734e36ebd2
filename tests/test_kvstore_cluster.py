"""The KV store against real servers: a real valkey and several block servers on loopback."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import grpc
import pytest
import redis

from kvstore.block import StoredBlock, chunk_messages
from kvstore.client import KVStoreClient, PutReport, SyncKVStoreClient
from kvstore.deadlines import CallBudget
from kvstore.index import Keys
from kvstore.shm_layout import SharedMemoryLayout, remove_dead_holders
from protos.splitserve.v1 import kvstore_pb2 as pb
from protos.splitserve.v1 import kvstore_pb2_grpc as pb_grpc
from tests.kv_helpers import make_blocks, spawn_holder, wait_for

MB = 1 << 20


def client(url, ns, **kw) -> KVStoreClient:
    return KVStoreClient(url, namespace=ns, **kw)


def index_entries(url: str, ns: str) -> dict[str, dict[str, str]]:
    r = redis.Redis.from_url(url, decode_responses=True)
    keys = list(r.scan_iter(Keys(ns).block("*"), count=1000))
    p = r.pipeline(transaction=False)
    for key in keys:
        p.hgetall(key)
    hashes = p.execute() if keys else []
    r.close()
    return {key.rsplit(":", 1)[1]: h for key, h in zip(keys, hashes, strict=True)}


@pytest.mark.parametrize("shm", [False, True], ids=["stream", "shm"])
def test_round_trip_is_byte_exact(redis_url, namespace, loop_thread, shm):
    for i in range(3):
        loop_thread.server(redis_url=redis_url, namespace=namespace, holder_id=f"h{i}", shm=shm)
    # Sizes around the chunking boundary and an empty payload.
    blocks = make_blocks(20, 3000) + make_blocks(2, 9 * MB + 1, seed=1) + make_blocks(1, 0, seed=2)

    async def go():
        async with client(redis_url, namespace, local_holder="h1", shared_memory=shm) as c:
            rep = await c.put(blocks)
            assert rep.ok and len(rep.stored) == len(blocks)
            res = await c.get([b.block_id for b in blocks])
            assert not res.missing
            for b in blocks:
                got = res.blocks[b.block_id]
                assert bytes(got.payload) == bytes(b.payload) and got.meta == b.meta
            again = await c.put(blocks)  # already indexed: nothing is sent twice
            assert again.ok
            delivered = {}  # the zero-copy path: views handed to a callback, copied out there
            res2 = await c.get(
                [b.block_id for b in blocks],
                into=lambda meta, view: delivered.__setitem__(meta.block_id, bytes(view)),
            )
            assert not res2.missing and not res2.blocks
            assert all(delivered[b.block_id] == bytes(b.payload) for b in blocks)
            return rep

    rep = asyncio.run(go())
    assert set(rep.stored.values()) == {"h1"}
    entries = index_entries(redis_url, namespace)
    assert set(entries) == {b.meta.hex for b in blocks}
    assert all(set(e) == {"h1"} and e["h1"].startswith("m:") for e in entries.values())


def test_closing_a_client_releases_its_shared_memory_reads(redis_url, namespace, loop_thread):
    s = loop_thread.server(redis_url=redis_url, namespace=namespace, holder_id="h", shm=True)
    blocks = make_blocks(8)

    async def go():
        async with client(redis_url, namespace, local_holder="h") as c:
            assert (await c.put(blocks)).ok
            assert not (await c.get([b.block_id for b in blocks])).missing

    asyncio.run(go())
    # A shared-memory read pins its blocks for a 10 s lease; the Unpin that ends it early goes
    # out in the background, and closing the client waits for it.
    assert s.store.stats().pinned_blocks == 0


def test_sync_client_and_unknown_ids(redis_url, namespace, loop_thread):
    loop_thread.server(redis_url=redis_url, namespace=namespace)
    blocks = make_blocks(3)
    with SyncKVStoreClient(redis_url, namespace=namespace) as c:
        assert c.put(blocks).ok
        unknown = os.urandom(16)
        res = c.get([blocks[0].block_id, unknown])
        assert list(res.blocks) == [blocks[0].block_id] and res.missing == [unknown]


def test_lending_places_overflow_on_the_peer_with_most_room(redis_url, namespace, loop_thread):
    mk = lambda hid, mem: loop_thread.server(  # noqa: E731
        redis_url=redis_url, namespace=namespace, holder_id=hid, memory_bytes=mem, shm=False
    )
    mk("local", 4 * MB)
    mk("small", 8 * MB)
    mk("big", 32 * MB)  # lends at most half: 16 MiB
    blocks = make_blocks(12, 1 * MB)

    async def go():
        async with client(redis_url, namespace, local_holder="local", shared_memory=False) as c:
            return await c.put(blocks)

    rep = asyncio.run(go())
    assert rep.ok
    where = [rep.stored[b.block_id] for b in blocks]
    assert where == ["local"] * 4 + ["big"] * 8
    big = next(s for s in loop_thread.servers if s.holder_id == "big")
    st = big.store.stats()
    assert st.lent_bytes == 8 * MB and st.memory_blocks == 8
    stored = next(iter(big.store.held()))[0]
    assert stored.owner == "local"


def test_concurrent_reservations_never_overcommit(redis_url, namespace, loop_thread):
    loop_thread.server(redis_url=redis_url, namespace=namespace, holder_id="peer",
                       memory_bytes=20 * MB, lend_fraction=1.0)  # fmt: skip

    async def go():
        async with client(redis_url, namespace) as c:
            await c.index.live_holders(refresh=True)
            got = await asyncio.gather(
                *(c.index.reserve("peer", 3 * MB, f"r{i}", 30_000) for i in range(16))
            )
            return sum(got)

    assert asyncio.run(go()) == 6  # 6 x 3 MiB fit in 20 MiB; the other 10 were refused


def test_redis_flush_and_restart_reannounce_within_5s(fresh_redis, namespace, loop_thread):
    url = fresh_redis.url
    servers = [loop_thread.server(redis_url=url, namespace=namespace, holder_id=f"h{i}",
                                  heartbeat_s=1.0, ttl_s=5.0) for i in range(3)]  # fmt: skip
    blocks = make_blocks(30)

    async def put_get(fn):
        async with client(url, namespace) as c:
            return await fn(c)

    asyncio.run(put_get(lambda c: c.put(blocks)))
    before = index_entries(url, namespace)
    assert len(before) == 30
    r = redis.Redis.from_url(url)
    r.flushall()
    took = wait_for(lambda: index_entries(url, namespace) == before, timeout=5.0)
    assert took < 5.0
    r.close()
    fresh_redis.restart()
    took = wait_for(lambda: index_entries(url, namespace) == before, timeout=5.0)
    res = asyncio.run(put_get(lambda c: c.get([b.block_id for b in blocks])))
    assert not res.missing
    assert all(s.index.reannounces >= 3 for s in servers), [s.index.reannounces for s in servers]


def test_dead_holder_expires_and_its_entries_are_cleaned(redis_url, namespace, loop_thread):
    keep = loop_thread.server(redis_url=redis_url, namespace=namespace, holder_id="keep")
    proc, _ = spawn_holder(redis_url, "doomed", "--namespace", namespace, "--memory", "16MiB")
    try:
        blocks = make_blocks(10)

        async def put():
            async with client(redis_url, namespace, local_holder="doomed") as c:
                return await c.put(blocks)

        assert set(asyncio.run(put()).stored.values()) == {"doomed"}
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

        async def get():
            async with client(redis_url, namespace) as c:
                return await c.get([b.block_id for b in blocks])

        # Until the TTL (5 s) ends the entries point at a dead address: the reader skips it.
        res = asyncio.run(get())
        assert sorted(res.missing) == sorted(b.block_id for b in blocks) and not res.blocks
        # Once expired, the janitor on a live holder deletes the dead holder's entries.
        wait_for(lambda: not index_entries(redis_url, namespace), timeout=15.0)
        assert keep.index is not None
    finally:
        proc.kill()
        proc.wait()


def test_kill_during_get_never_returns_wrong_bytes(redis_url, namespace, loop_thread):
    loop_thread.server(redis_url=redis_url, namespace=namespace, holder_id="backup", shm=False)
    proc, _ = spawn_holder(redis_url, "victim", "--namespace", namespace, "--memory", "256MiB",
                           "--no-shm")  # fmt: skip
    try:
        blocks = make_blocks(60, 2 * MB, seed=3)
        half = blocks[:30]

        async def go():
            async with client(redis_url, namespace, shared_memory=False) as c:
                rep = await c.put(blocks)  # nearest = most free memory: the victim
                assert rep.ok and set(rep.stored.values()) == {"victim"}
                # A second copy of half the blocks on the backup holder.
                backup = (await c.index.live_holders(refresh=True))["backup"]
                await c._send(backup, half, "", type(rep)())
                task = asyncio.create_task(c.get([b.block_id for b in blocks]))
                await asyncio.sleep(0.05)
                proc.send_signal(signal.SIGKILL)
                return await task

        res = asyncio.run(go())
        for bid, got in res.blocks.items():
            want = next(b for b in blocks if b.block_id == bid)
            assert bytes(got.payload) == bytes(want.payload)
        assert set(res.blocks) | set(res.missing) == {b.block_id for b in blocks}
        assert {b.block_id for b in half} <= set(res.blocks)  # the backup served what it had
    finally:
        proc.kill()
        proc.wait()


def test_a_hung_holder_is_left_for_the_next_after_the_stall_bound(redis_url, namespace,
                                                                 loop_thread):  # fmt: skip
    # SIGSTOP: the holder's connection stays open but nothing answers. A get gives up on it
    # after budget.stall_s without progress and asks the next holder (a Get has no deadline of
    # its own: the 60 s bound below is the test's, and only a stall bound keeps it from hanging).
    loop_thread.server(redis_url=redis_url, namespace=namespace, holder_id="backup", shm=False)
    proc, _ = spawn_holder(redis_url, "hung", "--namespace", namespace, "--memory", "128MiB",
                           "--no-shm")  # fmt: skip
    budget = CallBudget(base_s=2.0, stall_s=1.0)
    try:
        blocks = make_blocks(40, 64 * 1024, seed=4)
        half = blocks[:20]

        async def go():
            async with client(redis_url, namespace, shared_memory=False, budget=budget) as c:
                rep = await c.put(blocks)  # nearest = most free memory: the hung-to-be holder
                assert rep.ok and set(rep.stored.values()) == {"hung"}
                live = await c.index.live_holders(refresh=True)
                await c._send(live["backup"], half, "", PutReport())
                proc.send_signal(signal.SIGSTOP)
                res = await c.get([b.block_id for b in blocks])
                small, big = PutReport(), PutReport()
                await c._send(live["hung"], make_blocks(3, seed=5), "", small)
                await c._send(live["hung"], make_blocks(16, 4 * MB, seed=6), "", big)
                return res, small, big

        res, small, big = asyncio.run(asyncio.wait_for(go(), 60))
        # The backup served its copies; the rest, held only by the hung holder, are missing.
        assert set(res.blocks) == {b.block_id for b in half}
        assert sorted(res.missing) == sorted(b.block_id for b in blocks[20:])
        assert all(bytes(res.blocks[b.block_id].payload) == bytes(b.payload) for b in half)
        # A small put fits in the connection's buffers and ends at its deadline (base_s plus its
        # work); a 64 MiB one fills them, its writes stall, and it ends after stall_s (its
        # deadline, 2 s + 64 s at the 1 MiB/s floor, is far off).
        assert len(small.failed) == 3 and not small.stored
        assert all("DEADLINE_EXCEEDED" in w for w in small.failed.values())
        assert len(big.failed) == 16 and not big.stored
        assert all("no progress from holder hung for 1 s" in w for w in big.failed.values())
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait()


def test_slow_holders_are_waited_for_past_the_stall_bound(redis_url, namespace, loop_thread):
    # A holder slowed down (as on a busy machine) but still moving: a put that takes longer
    # than base_s and a get that takes longer than stall_s both succeed, because a put's deadline
    # grows with its blocks and a get is cut off only by silence.
    s = loop_thread.server(redis_url=redis_url, namespace=namespace, holder_id="slow", shm=False)
    budget = CallBudget(base_s=1.0, stall_s=1.0)
    blocks = make_blocks(1500, 512, seed=6)
    store_batch, read_block = 0.3, 0.002  # 6 batches of 256: 1.8 s; 1,500 reads: 3 s
    put_many, get_one = s.store.put_many, s.store.get
    s.store.put_many = lambda bs: time.sleep(store_batch) or put_many(bs)
    s.store.get = lambda bid: time.sleep(read_block) or get_one(bid)

    async def go():
        async with client(redis_url, namespace, shared_memory=False, budget=budget) as c:
            t0 = time.monotonic()
            rep = await c.put(blocks)
            t1 = time.monotonic()
            res = await c.get([b.block_id for b in blocks])
            return rep, res, t1 - t0, time.monotonic() - t1

    rep, res, put_s, get_s = asyncio.run(asyncio.wait_for(go(), 120))
    assert rep.ok and not res.missing
    assert all(bytes(res.blocks[b.block_id].payload) == bytes(b.payload) for b in blocks)
    # The injected sleeps alone make these longer than a fixed deadline of base_s / stall_s.
    assert put_s > budget.base_s and get_s > budget.stall_s


def test_call_budget_grows_with_the_work():
    b = CallBudget(base_s=10.0, floor_bytes_per_s=1 << 20, per_block_s=0.01)
    assert b.deadline_s(0, 0) == 10.0
    assert b.deadline_s(1000 * 512, 1000) == pytest.approx(10.0 + 0.48828125 + 10.0)
    assert b.deadline_s(64 << 20, 32) == pytest.approx(10.0 + 64 + 0.32)
    with pytest.raises(ValueError, match="stall_s must be positive"):
        CallBudget(stall_s=0)


def _stub(server):
    ch = grpc.insecure_channel(server.address)
    return ch, pb_grpc.KVStoreStub(ch)


def test_bad_requests_get_clear_status_codes(redis_url, namespace, loop_thread):
    s = loop_thread.server(redis_url=redis_url, namespace=namespace, max_block_bytes=1 * MB)
    ch, stub = _stub(s)
    try:
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Get(pb.GetRequest(block_ids=[os.urandom(16)])))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND and "not held" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Get(pb.GetRequest(block_ids=[b"short"])))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        def put(*chunks):
            return stub.Put(iter([pb.PutRequest(chunk=c) for c in chunks]))

        big = make_blocks(1, 2 * MB)[0]
        with pytest.raises(grpc.RpcError) as e:
            put(*chunk_messages(big.meta, big.payload))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "exceeds the limit" in e.value.details()

        ok = make_blocks(1, 100)[0]
        h = ok.meta.to_proto()
        h.tensors[0].shape[:] = [99]  # layout does not match the payload
        with pytest.raises(grpc.RpcError) as e:
            put(pb.BlockChunk(header=h, data=bytes(ok.payload), last=True))
        assert (
            e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "needs 99" in e.value.details()
        )

        with pytest.raises(grpc.RpcError) as e:  # malformed: data before any header
            put(pb.BlockChunk(data=b"abc", last=True))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        raw_put = ch.stream_unary("/splitserve.v1.KVStore/Put")  # bytes that aren't a PutRequest
        with pytest.raises(grpc.RpcError) as e:
            raw_put(iter([b"\x0a\xff\xff"]))
        assert (
            e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "malformed" in e.value.details()
        )

        with pytest.raises(grpc.RpcError) as e:  # the stream ends inside a block
            put(pb.BlockChunk(header=ok.meta.to_proto(), data=bytes(ok.payload)[:50]))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "ended inside" in e.value.details()

        with pytest.raises(grpc.RpcError) as e:  # corrupted in transit
            put(pb.BlockChunk(header=ok.meta.to_proto(), data=b"\0" * 100, last=True))
        assert "checksum" in e.value.details()

        with pytest.raises(grpc.RpcError) as e:
            stub.Pin(pb.PinRequest(block_ids=[ok.block_id], lease_ms=0))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        # The server is unharmed: a good put still lands.
        resp = put(*chunk_messages(ok.meta, ok.payload))
        assert [x.code for x in resp.statuses] == [pb.BlockStatus.OK]
        assert s.store.stats().memory_blocks == 1
    finally:
        ch.close()


def test_health_and_reflection(redis_url, namespace, loop_thread):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    s = loop_thread.server(redis_url=redis_url, namespace=namespace)
    ch = grpc.insecure_channel(s.address)
    try:
        h = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="splitserve.v1.KVStore")
        )
        assert h.status == health_pb2.HealthCheckResponse.SERVING
        req = reflection_pb2.ServerReflectionRequest(list_services="")
        resp = next(reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(iter([req])))
        names = {x.name for x in resp.list_services_response.service}
        assert "splitserve.v1.KVStore" in names
    finally:
        ch.close()


def test_32_clients_x_1000_blocks_consistent(redis_url, namespace, loop_thread):
    servers = [loop_thread.server(redis_url=redis_url, namespace=namespace, holder_id=f"h{i}",
                                  memory_bytes=24 * MB, shm=False) for i in range(3)]  # fmt: skip
    per_client = [make_blocks(1000, 512, seed=100 + i) for i in range(32)]

    async def one(i, blocks):
        async with client(redis_url, namespace, local_holder=f"h{i % 3}", shared_memory=False) as c:
            rep = await c.put(blocks)
            res = await c.get([b.block_id for b in blocks])
            return rep, res

    async def go():
        return await asyncio.wait_for(
            asyncio.gather(*(one(i, b) for i, b in enumerate(per_client))), 300
        )

    results = asyncio.run(go())
    for blocks, (rep, res) in zip(per_client, results, strict=True):
        assert rep.ok and not res.missing
        assert all(bytes(res.blocks[b.block_id].payload) == bytes(b.payload) for b in blocks)
    # Index == what the servers hold == the capacity ledger.
    entries = index_entries(redis_url, namespace)
    held = {}
    for s in servers:
        for meta, tier in s.store.held():
            held.setdefault(meta.hex, {})[s.holder_id] = f"{tier[0]}:{meta.size}"
    assert entries == held and len(entries) == 32_000
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    for s in servers:
        s.index.heartbeat()
        ledger = r.hgetall(Keys(namespace).holder(s.holder_id))
        st = s.store.stats()
        assert int(ledger["mem_used"]) == st.memory_used == 512 * st.memory_blocks
        assert int(ledger["lent"]) == st.lent_bytes
    r.close()


def test_cli_serve_kvstore_prints_its_address(redis_url, namespace):
    proc, addr = spawn_holder(redis_url, "cli", "--namespace", namespace, "--memory", "8MiB")
    try:
        assert addr.startswith("127.0.0.1:") and int(addr.rsplit(":", 1)[1]) > 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert not index_entries(redis_url, namespace)
    finally:
        proc.kill()
    bad = subprocess.run(
        [sys.executable, "-m", "splitserve.cli", "serve", "kvstore", "--memory", "lots"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 2 and "not a size" in bad.stderr and "Traceback" not in bad.stderr


def test_stored_block_from_engine_layout():
    import torch

    kv = torch.randn(2, 2, 16, 2, 8)
    payload = memoryview(kv.numpy()).cast("B")
    from kvstore.block import TensorSpec

    b = StoredBlock.build(b"k" * 16, "m", payload, [TensorSpec("float32", tuple(kv.shape))])
    back = torch.frombuffer(bytearray(b.payload), dtype=torch.float32).view(kv.shape)
    assert torch.equal(back, kv)


def test_a_killed_holders_shared_memory_is_removed_by_the_next(tmp_path):
    # A holder killed with SIGKILL can't clean up; its directory (with an arena as large as its
    # memory budget) stays in tmpfs until a holder starting on the host sees its lock is free.
    code = (
        "import sys, time; from pathlib import Path; "
        "from kvstore.shm_layout import SharedMemoryLayout; "
        "SharedMemoryLayout(Path(sys.argv[1])).create('dead'); print('up', flush=True); "
        "time.sleep(600)"
    )
    dead = tmp_path / "splitserve-dead"
    proc = subprocess.Popen([sys.executable, "-c", code, str(dead)], stdout=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "up"
        live = SharedMemoryLayout(tmp_path / "splitserve-live")
        live.create("live")
        (tmp_path / "splitserve-old").mkdir()  # no lock file: not ours to judge
        assert remove_dead_holders(tmp_path) == []  # both holders alive
        with pytest.raises(RuntimeError, match="running holder"):
            SharedMemoryLayout(dead).create("again")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert dead.exists()
        assert remove_dead_holders(tmp_path) == [dead]
        assert not dead.exists() and live.marker.exists() and (tmp_path / "splitserve-old").exists()
        live.release()
        assert not live.root.exists()
    finally:
        proc.kill()
        proc.wait()
