"""The embedding replica: sentence embeddings over gRPC (`Embed`), so the router, which loads no
torch, can embed requests for IC-Cache. It registers in the service registry as role "embed"
under its model's name; routers find it there.

    python -m services.embed --model DIR --port 0 [--redis URL]
"""

from __future__ import annotations

import asyncio
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from kvstore.config import Membership
from kvstore.registry import Registration, register_replica
from protos.splitserve.v1 import embed_pb2, embed_pb2_grpc
from rpc.server import ServiceApp
from services.embedder import MAX_TEXTS, BatchingEmbedder, Embedder

ROLE = "embed"
MAX_TEXT_CHARS = 32_768


class EmbedServicer(embed_pb2_grpc.EmbedServicer):
    def __init__(self, embedder: Embedder, app: ServiceApp, pool: ThreadPoolExecutor) -> None:
        self.embedder = embedder
        self.app = app
        # one thread: torch runs one batch at a time, off the event loop; concurrent calls
        # share a batch. Made here, inside the server's event loop.
        self.batcher = BatchingEmbedder(embedder, pool)
        self.inflight = 0

    async def Embed(self, request, context):
        if self.app.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "this embed server is draining")
        texts = list(request.texts)
        if len(texts) > MAX_TEXTS:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"at most {MAX_TEXTS} texts per call"
            )
        if any(len(t) > MAX_TEXT_CHARS for t in texts):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"a text is longer than {MAX_TEXT_CHARS} chars"
            )
        with self.app.track():
            self.inflight += 1
            try:
                vecs = await self.batcher.embed(texts)
            finally:
                self.inflight -= 1
        return embed_pb2.EmbedResponse(
            model=self.embedder.name, dim=self.embedder.dim, vectors=vecs.astype("<f4").tobytes()
        )


class EmbedServer:
    def __init__(
        self,
        model_dir: str | Path,
        host: str = "127.0.0.1",
        port: int = 0,
        cluster: Membership | None = None,
        name: str = "",
        threads: int | None = None,
    ) -> None:
        self.embedder = Embedder(model_dir, threads)
        self.name = name or self.embedder.name
        self.host, self.port = host, port
        self.cluster = cluster
        self.replica_id = f"{ROLE}-{uuid.uuid4().hex[:8]}"
        self.registration: Registration | None = None
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="embed")

    async def start(self) -> str:
        self.app = ServiceApp(self.host, self.port)
        self.servicer = EmbedServicer(self.embedder, self.app, self.pool)
        embed_pb2_grpc.add_EmbedServicer_to_server(self.servicer, self.app.server)
        self.app.add(embed_pb2.DESCRIPTOR.services_by_name["Embed"].full_name)
        await self.app.start()
        if self.cluster is not None and self.cluster.redis_url:
            self.registration = register_replica(
                self.cluster, ROLE, self.replica_id, model=self.name, address=self.app.address,
                load=lambda: {"running": self.servicer.inflight},
            )  # fmt: skip
        return self.app.address

    async def stop(self, drain_s: float = 5.0) -> None:
        if self.registration is not None:
            self.registration.close()
        await self.app.drain(drain_s)
        await self.app.stop()
        self.pool.shutdown(wait=False)


def main(argv: list[str] | None = None) -> None:
    """`python -m services.embed`: one replica in the foreground; prints its address once
    serving, stops on SIGTERM."""
    import argparse

    from rpc.server import run_until_signal

    ap = argparse.ArgumentParser(prog="python -m services.embed")
    ap.add_argument("--model", type=Path, required=True, help="sentence-transformers folder")
    ap.add_argument("--redis", default="", help="Redis URL of the service registry")
    ap.add_argument("--namespace", default="splitserve")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--name", default="", help="registered name (default: the folder's)")
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args(argv)
    cluster = Membership(redis_url=a.redis, namespace=a.namespace) if a.redis else None
    server = EmbedServer(a.model, a.host, a.port, cluster, a.name, a.threads or None)
    asyncio.run(run_until_signal(server.start, server.stop, lambda x: print(x, flush=True)))


if __name__ == "__main__":
    main()
