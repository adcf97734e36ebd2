"""Pieces of the router tests: backends for router.app, and the app served by a real uvicorn on
127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from types import SimpleNamespace

import uvicorn

from protos.splitserve.v1 import common_pb2 as cpb
from router.pd_client import PDClient
from rpc.piece import Piece
from rpc.ports import free_port as free_port  # for the tests and benchmarks that import it here
from services.engine.sampling_params import SamplingDefaults, SamplingParams


class ColocatedBackend:
    """The router's backend protocol over colocated decode servers, through PDClient.

    models: name -> (server address, max context length). Clients are made on first use, one
    per event loop that calls (gRPC channels belong to their loop: the HTTP app and the gRPC
    service may run on different ones here). `calls` records
    (model, request id, tenant) of every request."""

    def __init__(self, models: dict[str, tuple[str, int]]) -> None:
        self._models = models
        self.calls: list[tuple[str, str, str]] = []
        self._clients: dict[tuple[str, int], PDClient] = {}

    def models(self) -> list[tuple[str, int]]:
        return [(name, n) for name, (_, n) in self._models.items()]

    def set_address(self, model: str, address: str) -> None:
        """Point a model at another server (a client made since is dropped, not closed)."""
        self._models[model] = (address, self._models[model][1])
        self._clients = {k: c for k, c in self._clients.items() if k[0] != model}

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
        key = (model, id(asyncio.get_running_loop()))
        client = self._clients.get(key)
        if client is None:
            client = self._clients[key] = PDClient(self._models[model][0], model="tiny")
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


# -- the router over a real colocated server, HTTP and gRPC ------------------------------------

KEY, TIGHT_KEY = "sk-main-0123456789", "sk-tight-0123456789"


def engine(model_dir, **kw):
    from services.engine.config import EngineConfig
    from services.engine.engine import LLMEngine

    return LLMEngine(model_dir, EngineConfig(num_kv_blocks=256, **kw), seed=0)


@contextlib.contextmanager
def router_stack(
    model_dir, engine: dict | None = None, admission=None, broken_models: bool = True
) -> Iterator[SimpleNamespace]:
    """The app with auth on, a tenant `main` and a tenant `tight` (1 running, none queued),
    over a colocated server, and the gRPC Generate service on the same tenants; `busy` names a
    server that refuses every request (max_waiting 0), `down` an address nobody listens on.
    engine: the colocated server's EngineConfig fields (256 KV blocks by default); admission:
    the router's gate (router.admission.Gate) for both APIs, None: the tenants' limits only.
    broken_models False: only `tiny` and `tiny-capped` are served (no `busy`, `down`, `flaky`)."""
    import grpc
    import openai

    from router.app import build_app
    from router.grpc_api import GenerateServicer, add_to_server
    from router.metrics import RouterMetrics
    from router.tenants import Tenants, hash_key
    from services.engine.tokenizer import load_tokenizer
    from tests.kv_helpers import LoopThread
    from tests.replica_helpers import decode_server

    lt = LoopThread()
    server = decode_server(model_dir, engine={"num_kv_blocks": 256, **(engine or {})},
                           colocated=True)  # fmt: skip
    busy = decode_server(model_dir, engine={"num_kv_blocks": 256}, colocated=True, max_waiting=0)
    lt.run(server.start())
    lt.run(busy.start())
    # `down`: a port held bound but not listening for the stack's life, so connections are
    # refused and no server started later (the gRPC one below) can be given it.
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    down = f"127.0.0.1:{held.getsockname()[1]}"
    max_len = server.engine.max_model_len
    models = {"tiny": (server.address, max_len), "tiny-capped": (server.address, max_len)}
    if broken_models:
        models.update(busy=(busy.address, max_len), down=(down, max_len), flaky=(down, max_len))
    backend = ColocatedBackend(models)
    tok = load_tokenizer(model_dir)
    tenants = Tenants.from_dict(
        {
            "tenants": [
                {"name": "main", "keys": [hash_key(KEY)], "max_concurrent": 64},
                {"name": "tight", "keys": [hash_key(TIGHT_KEY)], "max_concurrent": 1,
                 "max_queued": 0},
            ]
        }
    )  # fmt: skip
    tokenizers = dict.fromkeys(models, tok)
    # The same server under a name whose requests default to greedy and 7 tokens.
    defaults = {"tiny-capped": SamplingDefaults(max_tokens=7, temperature=0.0)}
    metrics = RouterMetrics(tenants, admission)
    app = build_app(backend, tokenizers, tenants, max_body_bytes=1 << 20, metrics=metrics,
                    defaults=defaults, admission=admission)  # fmt: skip

    async def start_grpc():
        g = grpc.aio.server()
        svc = GenerateServicer(backend, tokenizers, tenants, defaults, admission)
        add_to_server(svc, g)
        port = g.add_insecure_port("127.0.0.1:0")
        await g.start()
        return g, f"127.0.0.1:{port}"

    grpc_server, grpc_addr = lt.run(start_grpc())
    try:
        with serve(app) as url:
            yield SimpleNamespace(
                url=url, server=server, lt=lt, backend=backend, tok=tok, max_len=max_len,
                grpc=grpc_addr, tenants=tenants, admission=admission,
                client=openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0),
            )  # fmt: skip
    finally:
        lt.run(grpc_server.stop(None))
        lt.run(server.stop(drain_s=1))
        lt.run(busy.stop(drain_s=1))
        lt.close()
        held.close()


def in_use(stack) -> int:
    """KV blocks in use on the stack's server, after its integrity check."""
    return stack.lt.run(stack.server.loop.call(lambda e: e.check_integrity())).in_use


def wait_released(request) -> None:
    """After a test that used the module's `stack`: its server's block pool is intact and
    every block is released."""
    from tests.kv_helpers import wait_for

    if "stack" in request.fixturenames:
        stack = request.getfixturevalue("stack")
        wait_for(lambda: in_use(stack) == 0, timeout=30)


def assert_error_shape(r) -> dict:
    """An OpenAI-style error body on a 4xx."""
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str)
    assert err["param"] is None or isinstance(err["param"], str)
    assert err["code"] is None or isinstance(err["code"], str)
    return err
