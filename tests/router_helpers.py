"""Pieces of the router tests: backends for router.app, and the app served by a real uvicorn on
127.0.0.1."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import AsyncIterator, Iterator

import uvicorn

from protos.splitserve.v1 import common_pb2 as cpb
from services.engine.sampling_params import SamplingParams
from services.pd_client import PDClient, Piece


class ColocatedBackend:
    """The router's backend protocol over colocated decode servers, through PDClient.

    models: name -> (server address, max context length). Clients are made on first use, in
    the event loop that serves the app (gRPC channels belong to their loop). `calls` records
    (model, request id, tenant) of every request."""

    def __init__(self, models: dict[str, tuple[str, int]]) -> None:
        self._models = models
        self.calls: list[tuple[str, str, str]] = []
        self._clients: dict[str, PDClient] = {}

    def models(self) -> list[tuple[str, int]]:
        return [(name, n) for name, (_, n) in self._models.items()]

    def set_address(self, model: str, address: str) -> None:
        """Point a model at another server (a client made since is dropped, not closed)."""
        self._models[model] = (address, self._models[model][1])
        self._clients.pop(model, None)

    async def generate(
        self,
        model: str,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str,
        tenant: str = "",
        **_: object,
    ) -> AsyncIterator[Piece]:
        self.calls.append((model, request_id, tenant))
        client = self._clients.get(model)
        if client is None:
            client = self._clients[model] = PDClient(self._models[model][0], model="tiny")
        gen = client.generate(prompt_ids, params, request_id, tenant)
        try:
            async for piece in gen:
                yield piece
        finally:
            await gen.aclose()


class InstantBackend:
    """Pieces with no model behind them (one token " tok" each), so that what a measurement
    sees is the router's own cost."""

    def models(self) -> list[tuple[str, int]]:
        return [("tiny", 1 << 20)]

    async def generate(
        self, model: str, prompt_ids: list[int], params: SamplingParams, request_id: str, **_
    ) -> AsyncIterator[Piece]:
        for _ in range(params.max_tokens - 1):
            yield Piece([5], " tok")
        usage = cpb.Usage(prompt_tokens=len(prompt_ids), completion_tokens=params.max_tokens)
        yield Piece([5], " tok", finish_reason="length", usage=usage)


@contextlib.contextmanager
def serve(app) -> Iterator[str]:
    """The app on a uvicorn server on 127.0.0.1 at a free port, in a thread; yields its URL."""
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
