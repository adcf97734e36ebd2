"""The GPU hand-off path: a holder's device pool read by another process through CUDA IPC, and
every fallback (no pool, bytes for a reader that can't map it, absent blocks)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap

import grpc
import pytest
import torch

from kvstore.client import KVStoreClient
from kvstore.cuda_ipc import CudaIpcTransport, DeviceBlock
from kvstore.transport import StreamTransport
from protos.splitserve.v1 import kvstore_pb2 as gpb
from tests.kv_helpers import make_blocks


def test_reader_without_a_pool_on_the_holder_falls_back(redis_url, namespace, loop_thread):
    # A CUDA-IPC reader (no GPU is touched until a pool answers) against a holder without a
    # device pool: GetDevice is refused with FAILED_PRECONDITION and the blocks come as bytes.
    h = loop_thread.server(redis_url=redis_url, namespace=namespace, shm=False)
    blocks = make_blocks(6, 8192, seed=3)
    h.store.put_many(blocks)

    async def go():
        c = KVStoreClient(redis_url, namespace, shared_memory=False)
        ipc = CudaIpcTransport("cuda:0", StreamTransport())
        c.transports.insert(0, ipc)
        try:
            res = await c.get([b.block_id for b in blocks], source=h.holder_id)
            again = await c.get([blocks[0].block_id], source=h.holder_id)
        finally:
            await c.close()
        return res, again, ipc

    res, again, ipc = loop_thread.run(go())
    assert not res.missing and not again.missing
    assert {k: bytes(v.payload) for k, v in res.blocks.items()} == {
        b.block_id: bytes(b.payload) for b in blocks
    }
    assert h.holder_id in ipc._unusable  # asked once, then not again


def test_source_holder_first_then_the_index(redis_url, namespace, loop_thread):
    a = loop_thread.server(redis_url=redis_url, namespace=namespace)
    b = loop_thread.server(redis_url=redis_url, namespace=namespace)
    on_a, on_b = make_blocks(3, 4096, seed=4), make_blocks(3, 4096, seed=5)
    a.store.put_many(on_a)
    b.store.put_many(on_b)
    ids = [x.block_id for x in on_a + on_b]

    async def go():
        async with KVStoreClient(redis_url, namespace) as c:
            return await c.get(ids, source=a.holder_id), await c.get(ids, source="gone")

    res, res_unknown = loop_thread.run(go())
    assert not res.missing and not res_unknown.missing
    assert {res.sources[x.block_id] for x in on_a} == {a.holder_id}
    assert {res.sources[x.block_id] for x in on_b} == {b.holder_id}


HOLDER = textwrap.dedent(
    """
    import asyncio, sys, torch
    from kvstore.device_pool import DevicePool
    from kvstore.config import KVStoreConfig, Membership
    from kvstore.server import KVStoreServer
    from services.wire import device_meta
    from services.engine.kv_transfer import KVBlock

    async def main():
        pool = DevicePool(8 << 20, "cuda")
        cluster = Membership(redis_url=sys.argv[1], namespace=sys.argv[2], heartbeat_s=0.25,
                             ttl_s=1.5)
        s = KVStoreServer(KVStoreConfig(memory_bytes=8 << 20, cluster=cluster), pool)
        await s.start()
        g = torch.Generator(device="cuda").manual_seed(7)
        blocks = []
        for i in range(5):
            kv = torch.randn(2, 2, 16, 2, 8, device="cuda", generator=g).to(torch.bfloat16)
            blocks.append(KVBlock(bytes([i]) * 16, tuple(range(16)), kv))
        metas = [device_meta(b, "m") for b in blocks]
        placed, _ = pool.put([(m, b.kv) for m, b in zip(metas, blocks)], "prefill-pin", 30.0)
        assert len(placed) == 5
        torch.save([b.kv.cpu() for b in blocks], sys.argv[3])
        print(s.holder_id, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        print(pool.live_pins, pool.pinned_blocks, flush=True)
        await s.stop(grace=0.5)

    asyncio.run(main())
    """
)


@pytest.mark.gpu
def test_cuda_ipc_pull_from_another_process(redis_url, namespace, tmp_path):
    expect_path = tmp_path / "kv.pt"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, redis_url, namespace, str(expect_path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), *sys.path])},
    )  # fmt: skip
    try:
        holder_id = proc.stdout.readline().strip()
        assert holder_id, "the holder did not start"
        expect = torch.load(expect_path)
        ids = [bytes([i]) * 16 for i in range(5)] + [b"\xff" * 16]

        async def go():
            async with KVStoreClient(redis_url, namespace, device="cuda:0") as dev:
                r_dev = await dev.get(ids, source=holder_id)
                # Its Unpin goes out in the background; closing the client waits for it.
            async with KVStoreClient(redis_url, namespace, shared_memory=False) as host:
                r_host = await host.get(ids[:2], source=holder_id)
            return r_dev, r_host

        r_dev, r_host = asyncio.run(go())
        assert r_dev.missing == [b"\xff" * 16]
        for i in range(5):
            got = r_dev.blocks[ids[i]]
            assert isinstance(got, DeviceBlock) and got.payload.is_cuda
            kv = got.payload.view(torch.bfloat16).view(expect[i].shape)
            assert torch.equal(kv.cpu(), expect[i])
        # A reader that can't map the pool gets the same bytes, CRC-checked.
        for i in range(2):
            raw = torch.frombuffer(bytearray(r_host.blocks[ids[i]].payload), dtype=torch.bfloat16)
            assert torch.equal(raw.view(expect[i].shape), expect[i])
        proc.stdin.write("\n")
        proc.stdin.flush()
        # The reader's pin is released (Unpin); only the prefill's own is left, on 5 blocks.
        assert proc.stdout.readline().split() == ["1", "5"]
    finally:
        proc.kill()
        proc.wait(10)


def _kv_blocks(n: int, seed: int = 0):
    from services.engine.kv_transfer import KVBlock
    from services.wire import device_meta

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        kv = torch.randn(2, 2, 16, 2, 8, generator=g)  # 4 KiB of float32
        b = KVBlock(bytes([seed, i]) * 8, tuple(range(16)), kv)
        out.append((device_meta(b, "m"), b.kv))
    return out


def test_device_pool_policy_pins_eviction_and_leases():
    from kvstore.device_pool import DevicePool

    now = [0.0]
    pool = DevicePool(4 * 4096, "cpu", clock=lambda: now[0])  # room for exactly 4 blocks
    a, b = _kv_blocks(3, seed=1), _kv_blocks(2, seed=2)
    placed, new = pool.put(a, "p1", 10.0)
    assert placed == new == [m.block_id for m, _ in a]
    placed, new = pool.put(a[:1], "p2", 10.0)  # already held: pinned again, not copied again
    assert (placed, new, pool.puts) == ([a[0][0].block_id], [], 3)
    placed, _ = pool.put(b, "p3", 10.0)  # one fits; the other finds every block pinned
    assert placed == [b[0][0].block_id] and pool.evictions == 0
    assert pool.unpin("p1") == 3 and pool.unpin("p1") == 0
    placed, _ = pool.put(b[1:], "p3", 10.0)  # now the oldest unpinned block gives way
    assert placed == [b[1][0].block_id] and pool.evictions == 1
    assert a[1][0].block_id not in pool.entries  # a[0] is still pinned by p2
    found, absent = pool.locate([a[0][0].block_id, a[1][0].block_id], "reader", 1.0)
    assert [m.block_id for m, _ in found] == [a[0][0].block_id]
    assert absent == [a[1][0].block_id]
    now[0] = 11.0  # every lease has ended: nothing is pinned any more
    assert pool.pinned_blocks == 0
    got = pool.read(b[0][0].block_id)
    got.verify()  # the CRC is computed as the bytes leave the pool
    assert bytes(got.payload) == b[0][1].numpy().tobytes()
    with pytest.raises(RuntimeError, match="CUDA IPC needs a GPU"):
        pool.share()


def test_device_pool_blocks_reach_readers_as_bytes(redis_url, namespace, loop_thread):
    # A holder whose pool can't be mapped by this reader (here: not on a GPU) serves the same
    # blocks through Get, CRC-checked; GetDevice says why it can't; Unpin releases pool pins.
    from kvstore.device_pool import DevicePool

    pool = DevicePool(1 << 20, "cpu")
    h = loop_thread.server(redis_url=redis_url, namespace=namespace, device_pool=pool)
    blocks = _kv_blocks(4, seed=3)
    pool.put(blocks, "prefill-pin", 30.0)
    ids = [m.block_id for m, _ in blocks]

    async def go():
        async with KVStoreClient(redis_url, namespace) as c:
            res = await c.get(ids, source=h.holder_id)
            stub = c._stub((await c.index.live_holders())[h.holder_id])
            try:
                await stub.GetDevice(
                    gpb.GetDeviceRequest(block_ids=ids, pin_id="x", lease_ms=100), timeout=5
                )
            except grpc.aio.AioRpcError as e:
                refused = (e.code(), e.details())
            released = await c.unpin(h.address, "prefill-pin")
        return res, refused, released

    res, refused, released = loop_thread.run(go())
    assert not res.missing and set(res.sources.values()) == {h.holder_id}
    for m, kv in blocks:
        assert bytes(res.blocks[m.block_id].payload) == kv.numpy().tobytes()
    assert refused == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "this holder's device pool isn't on a GPU",
    )
    assert released == 4 and pool.pinned_blocks == 0
