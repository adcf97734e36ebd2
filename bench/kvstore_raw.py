"""The raw stream: gRPC carrying bytes with no protobuf, no store and no checksum, the
ceiling bench/kvstore.py measures the store's Put and Get against. `python
bench/kvstore_raw.py` serves it (prints its address; SIGTERM stops it); RawPut and RawGet
drive it."""

from __future__ import annotations

import asyncio
import signal
import struct
import sys
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.kvstore_common import (
    RAW_SERVICE,
    BenchError,
    BlockShape,
    Config,
    Op,
    chunks_of,
    payloads,
)
from rpc.channel import GRPC_OPTIONS


async def serve_raw() -> None:
    """bytes in, bytes out: no protobuf, no store, no checksum. Prints its address, serves until
    SIGTERM."""
    held: dict[tuple[int, int], list[bytes]] = {}

    async def put(request_iterator, context):
        # Each chunk dropped once counted: a store copies it into memory of its own (the holder's
        # arena) and drops it too, so the transport alone is the ceiling.
        n = 0
        async for chunk in request_iterator:
            n += len(chunk)
        return n.to_bytes(8, "little")

    async def get(request, context):
        count, nbytes = struct.unpack("<QQ", request)
        if (count, nbytes) not in held:  # made on the client's warm-up call, kept after
            held[(count, nbytes)] = chunks_of(payloads(nbytes, count, seed=7))
        for c in held[(count, nbytes)]:
            yield c

    server = grpc.aio.server(options=GRPC_OPTIONS)
    handler = grpc.method_handlers_generic_handler(
        RAW_SERVICE,
        {
            "Put": grpc.stream_unary_rpc_method_handler(put),
            "Get": grpc.unary_stream_rpc_method_handler(get),
        },
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"127.0.0.1:{port}", flush=True)
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    await done.wait()
    await server.stop(0)


class RawPut(Op):
    def __init__(self, address: str, shape: BlockShape, cfg: Config, seed: int) -> None:
        self.address = address
        self.chunks = chunks_of(payloads(shape.nbytes, cfg.batch, seed))
        # The puts' cap too: interleaved with them, it covers the same window with as many calls.
        self.nbytes, self.blocks, self.cap = shape.nbytes * cfg.batch, cfg.batch, cfg.put_cap_bytes

    async def __aenter__(self) -> RawPut:
        self.channel = grpc.aio.insecure_channel(self.address, options=GRPC_OPTIONS)
        self.put = self.channel.stream_unary(f"/{RAW_SERVICE}/Put")
        return self

    async def __aexit__(self, *exc) -> None:
        await self.channel.close()

    async def call(self, i: int) -> None:
        async def stream():
            for c in self.chunks:
                yield c

        got = int.from_bytes(await self.put(stream()), "little")
        if got != self.nbytes:
            raise BenchError(f"raw put: the server counted {got} bytes of {self.nbytes}")


class RawGet(Op):
    def __init__(self, address: str, shape: BlockShape, cfg: Config, keep: bool = True) -> None:
        self.address, self.keep = address, keep
        self.request = struct.pack("<QQ", cfg.batch, shape.nbytes)
        self.nbytes, self.blocks = shape.nbytes * cfg.batch, cfg.batch

    async def __aenter__(self) -> RawGet:
        self.channel = grpc.aio.insecure_channel(self.address, options=GRPC_OPTIONS)
        self.get = self.channel.unary_stream(f"/{RAW_SERVICE}/Get")
        return self

    async def __aexit__(self, *exc) -> None:
        await self.channel.close()

    async def call(self, i: int) -> None:
        # A get delivers what it received into the caller's memory (a KV cache): each chunk is
        # copied into one preallocated buffer, as the store's `get(ids, into=...)` does.
        # `keep=False` drops each chunk unread instead: what the bare stream costs.
        if not hasattr(self, "dst"):
            self.dst = np.empty(self.nbytes, np.uint8)
        got = 0
        async for chunk in self.get(self.request):
            if self.keep:
                self.dst[got : got + len(chunk)] = np.frombuffer(chunk, np.uint8)
            got += len(chunk)
        if got != self.nbytes:
            raise BenchError(f"raw get: {got} bytes of {self.nbytes}")


if __name__ == "__main__":
    asyncio.run(serve_raw())
