"""The GPU hand-off path: a holder's device pool read by another process through CUDA IPC, and
every fallback (no pool, bytes for a reader that can't map it, absent blocks)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from kvstore.client import KVStoreClient
from kvstore.cuda_ipc import CudaIpcTransport, DeviceBlock
from kvstore.transport import StreamTransport
from tests.kv_helpers import make_blocks

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


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
    from kvstore.server import KVStoreServer
    from services.prefill import device_meta
    from services.engine.kv_transfer import KVBlock

    async def main():
        pool = DevicePool(8 << 20, "cuda")
        s = KVStoreServer(8 << 20, sys.argv[1], namespace=sys.argv[2], device_pool=pool,
                          heartbeat_s=0.25, ttl_s=1.5)
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
        print(len(pool._pins), pool.pinned_blocks, flush=True)
        await s.stop(grace=0.5)

    asyncio.run(main())
    """
)


@gpu
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
                await asyncio.sleep(0.5)  # the reader's Unpin goes out in the background
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
