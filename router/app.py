"""The OpenAI-compatible HTTP API as a FastAPI app over an injected backend (Ray Serve wraps it;
tests serve it with uvicorn).

    app = build_app(backend, {"tiny": load_tokenizer(d)}, Tenants.load("tenants.yaml"))

A request goes: API key -> tenant; body (size-capped) -> validated request -> Plan (prompt ids,
sampling parameters per choice); a tenant slot; one backend stream per choice; then a JSON
response or an SSE stream. Streams are primed (first piece awaited) before the response starts,
so the backend's refusals still become HTTP statuses. A client that goes away, before or during
the response, closes every backend stream (which aborts the request on its replica) and frees
the tenant slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from router import errors
from router.config import DEFAULT_MAX_BODY_BYTES
from router.errors import APIError, from_exception
from router.metrics import RouterMetrics
from router.openai_api import Kind, Plan, Shaper, TokenTexts, parse, plan, prompts_of, text_length
from router.schemas import ChatCompletionRequest, CompletionRequest
from router.tenants import Tenant, TenantBusyError, Tenants, priority_levels_of
from rpc.piece import Piece
from services.engine.sampling_params import SamplingDefaults, SamplingParams
from services.engine.tokenizer import Tokenizer

if TYPE_CHECKING:
    from router.iccache.cache import Decision, ICCache

log = logging.getLogger(__name__)

OFFLOAD_CHARS = 16_384  # tokenize prompts longer than this off the event loop


class Backend(Protocol):
    """Where requests run (router.backend.PoolBackend picks replicas and uses PDClient).

    generate: the request's pieces as they come, the last with finish_reason and usage. It is
    an async generator: nothing runs until the first `anext`, and `aclose()` at any point
    cancels the request on its replica. Raises grpc.aio.AioRpcError (INVALID_ARGUMENT,
    RESOURCE_EXHAUSTED, UNAVAILABLE), ValueError for a request it cannot run, and RuntimeError
    when no replica serves the model. `tenant` names the caller ("" with auth off);
    `cache_salt` is its cache scope (Tenant.cache_salt), under which the prompt's KV blocks are
    named, so it shares cached prefixes only with its own scope.
    models: (name, max context length) of each served model."""

    def models(self) -> list[tuple[str, int]]: ...

    def generate(
        self,
        model: str,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str,
        *,
        tenant: str = "",
        **kwargs: Any,
    ) -> AsyncIterator[Piece]: ...


def build_app(
    backend: Backend,
    tokenizers: dict[str, Tokenizer],
    tenants: Tenants | None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    metrics: RouterMetrics | None = None,
    defaults: dict[str, SamplingDefaults] | None = None,
    iccache: ICCache | None = None,
) -> FastAPI:
    """tenants=None turns authentication off (the local demo only). GET /metrics serves
    `metrics` (a fresh RouterMetrics when not given). defaults: per model, the sampling a
    request gets for what it leaves unset (the built-in SamplingDefaults otherwise).
    iccache: IC-Cache's routes (router.iccache) and POST /v1/feedback."""
    defaults = defaults or {}
    priority_levels = priority_levels_of(tenants)
    texts = {name: TokenTexts(tok) for name, tok in tokenizers.items()}
    metrics = metrics or RouterMetrics(tenants)
    app = FastAPI(title="splitserve", docs_url=None, redoc_url=None, openapi_url=None)
    _install_error_handlers(app)

    def served() -> dict[str, int]:
        return {name: n for name, n in backend.models() if name in tokenizers}

    def authenticate(request: Request) -> Tenant | None:
        if tenants is None:
            return None
        auth = request.headers.get("authorization")
        if not auth:
            raise errors.unauthorized(
                "You didn't provide an API key. Send it in an Authorization header using "
                "Bearer auth (Authorization: Bearer YOUR_KEY)."
            )
        scheme, _, key = auth.partition(" ")
        t = tenants.lookup(key.strip()) if scheme.lower() == "bearer" else None
        if t is None:
            raise errors.unauthorized("Incorrect API key provided.")
        return t

    async def handle(request: Request, kind: Kind) -> Response:
        t0 = time.perf_counter()
        tenant: Tenant | None = None
        model, status = "", 500
        try:
            tenant = authenticate(request)
            body = await _read_body(request, max_body_bytes)
            req = parse(kind, body)
            models = served()
            decision = None
            if iccache is not None and iccache.route(req.model) is not None:
                from router.iccache import http as ic_http

                name = tenant.name if tenant is not None else ""
                req, decision = await ic_http.decide(iccache, kind, req, name)
            if req.model not in models:
                raise errors.model_not_found(req.model)
            model = req.model
            response = await answer(request, kind, req, models[model], tenant, decision)
            status = response.status_code
            return response
        except APIError as e:
            status = e.status
            raise
        except asyncio.CancelledError:
            status = 499  # the server or proxy gave up on the request
            raise
        finally:
            name = tenant.name if tenant is not None else ""
            metrics.record(kind, model, name, status, time.perf_counter() - t0)

    async def answer(
        request: Request,
        kind: Kind,
        req: CompletionRequest | ChatCompletionRequest,
        max_model_len: int,
        tenant: Tenant | None,
        decision: Decision | None = None,
    ) -> Response:
        tok = tokenizers[req.model]
        try:
            if text_length(req) > OFFLOAD_CHARS:
                prompts = await asyncio.to_thread(prompts_of, req, tok)
            else:
                prompts = prompts_of(req, tok)
        except ValueError as e:  # text the tokenizer refuses (UnicodeError is a ValueError)
            raise errors.bad_request(
                f"cannot tokenize the input: {e}", code="invalid_value"
            ) from None
        p = plan(kind, req, prompts, max_model_len, defaults.get(req.model))
        if p.priority is not None and p.priority >= priority_levels:
            raise errors.bad_request(
                f"priority must be within [0, {priority_levels}), got {p.priority}",
                param="priority", code="invalid_value",
            )  # fmt: skip
        shaper = Shaper(p, texts[req.model])
        return await _until_disconnect(request, run(p, shaper, tenant, decision))

    async def run(
        p: Plan, shaper: Shaper, tenant: Tenant | None, decision: Decision | None = None
    ) -> Response:
        if tenant is not None:
            try:
                await tenant.acquire()
            except TenantBusyError as e:
                raise errors.too_many_requests(str(e)) from None
        streams = Streams(tenant)
        handed_over = False
        ic_headers: dict[str, str] = {}
        if decision is not None:
            from router.iccache import http as ic_http

            assert iccache is not None
            ic_headers = ic_http.headers(decision)
            iccache.load.start(p.model)
            streams.on_close = lambda: iccache.load.end(p.model)
        try:
            streams.open(backend, p)
            if p.stream:
                await streams.prime()
                handed_over = True  # the SSE response closes them now
                sse = SSEResponse(_sse(shaper, streams), streams.close)
                sse.headers.update(ic_headers)
                if decision is not None:  # kept for feedback; a stream is never admitted
                    await iccache.finish(decision, p.request_id, "", None, 0)
                return sse
            await streams.collect(shaper)
            body = shaper.response()
            if decision is not None:
                body = await ic_http.finish(iccache, decision, body)
            return _json(body, headers=ic_headers)
        except Exception as e:
            raise from_exception(_unwrap(e)) from None
        finally:
            if not handed_over:
                await streams.close()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await handle(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await handle(request, "chat")

    created = int(time.time())

    @app.get("/v1/models")
    async def list_models(request: Request) -> Response:
        authenticate(request)
        data = [
            {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "splitserve",
                "max_model_len": n,
            }
            for name, n in served().items()
        ]
        return _json({"object": "list", "data": data})

    if iccache is not None:

        @app.post("/v1/feedback")
        async def feedback(request: Request) -> Response:
            from router.iccache import http as ic_http

            tenant = authenticate(request)
            body = await _read_body(request, max_body_bytes)
            name = tenant.name if tenant is not None else ""
            return _json(await ic_http.feedback(iccache, body, name))

    readiness = getattr(backend, "readiness", None)

    @app.get("/health")
    async def health() -> Response:
        """200 while requests can be served ("degraded" with the reason when some part is
        down but requests still run); 503 with the reason otherwise (a model without live
        replicas, the cluster's Redis unreachable with none known), so probes and operators
        see the truth."""
        ready, reason = await readiness() if readiness is not None else (True, None)
        if not ready:
            return _json({"status": "unavailable", "reason": reason}, 503,
                         {"Retry-After": str(errors.RETRY_AFTER_S)})  # fmt: skip
        if reason is not None:
            return _json({"status": "degraded", "reason": reason})
        return _json({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


def _json(obj: dict, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        json.dumps(obj, separators=(",", ":")).encode(),
        status,
        headers,
        media_type="application/json",
    )


def _install_error_handlers(app: FastAPI) -> None:
    """Every error leaves in the OpenAI shape: ours, routing's (404, 405), and the unexpected
    (500, logged here with its traceback, never sent)."""

    async def api_error(_: Request, e: APIError) -> Response:
        return e.response()

    async def http_error(request: Request, e: StarletteHTTPException) -> Response:
        msg = {404: f"Unknown request URL: {request.method} {request.url.path}"}.get(
            e.status_code, str(e.detail)
        )
        return APIError(e.status_code, msg, headers=e.headers).response()

    async def validation_error(_: Request, e: RequestValidationError) -> Response:
        return errors.bad_request(str(e)).response()

    async def internal_error(_: Request, e: Exception) -> Response:
        log.error("unhandled error", exc_info=e)
        return APIError(500, "internal server error", type="server_error").response()

    app.add_exception_handler(APIError, api_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, internal_error)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise errors.bad_request("Content-Length is not a number")
        if int(declared) > limit:
            raise errors.payload_too_large(limit)
    parts, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise errors.payload_too_large(limit)
        parts.append(chunk)
    return b"".join(parts)


def _unwrap(e: BaseException) -> BaseException:
    """The first real error of a TaskGroup's ExceptionGroup."""
    while isinstance(e, BaseExceptionGroup):
        real = [x for x in e.exceptions if not isinstance(x, asyncio.CancelledError)]
        e = (real or list(e.exceptions))[0]
    return e


# -- backend streams ---------------------------------------------------------------------------


class StreamEndedError(RuntimeError):
    """A backend stream ended without a finish_reason."""


class Streams:
    """One backend stream per choice of a request, and the tenant slot they hold.

    close() is idempotent and must run once the streams are no longer read: it closes every
    backend iterator (cancelling whatever still runs on the replicas) and frees the slot."""

    def __init__(self, tenant: Tenant | None) -> None:
        self.its: list[AsyncIterator[Piece]] = []
        self.firsts: list[Piece] = []
        self._tenant = tenant
        self._closed = False
        self.on_close: Callable[[], None] | None = None  # runs once, when the streams close

    def open(self, backend: Backend, p: Plan) -> None:
        t = self._tenant
        name, salt = (t.name, t.cache_salt) if t is not None else ("", "")
        for k, s in enumerate(p.subs):
            rid = f"{p.request_id}-{k}"
            gen = backend.generate(
                p.model, s.prompt_ids, s.params, rid, tenant=name, priority=p.priority,
                cache_salt=salt,
            )  # fmt: skip
            self.its.append(gen)

    async def prime(self) -> None:
        """Wait for every stream's first piece, so that a refusal arrives before the response
        has started."""
        if len(self.its) == 1:
            self.firsts = [await _next(self.its[0])]
            return
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(_next(it)) for it in self.its]
        self.firsts = [t.result() for t in tasks]

    async def pieces(self) -> AsyncIterator[tuple[int, Piece]]:
        """(stream index, piece) as they come, first pieces first; each stream up to and
        including its piece with a finish_reason."""
        live = []
        for k, first in enumerate(self.firsts):
            yield k, first
            if not first.finish_reason:
                live.append(k)
        if len(live) == 1:  # the common case, without tasks
            it = self.its[live[0]]
            while True:
                piece = await _next(it)
                yield live[0], piece
                if piece.finish_reason:
                    return
        pending = {asyncio.ensure_future(_next(self.its[k])): k for k in live}
        try:
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for f in done:
                    k = pending.pop(f)
                    piece = f.result()
                    if not piece.finish_reason:
                        pending[asyncio.ensure_future(_next(self.its[k]))] = k
                    yield k, piece
        finally:
            for f in pending:
                f.cancel()
            if pending:
                await asyncio.wait(pending)

    async def collect(self, shaper: Shaper) -> None:
        """Run every stream to its end, into the shaper's choice states."""

        async def one(k: int) -> None:
            st = shaper.states[k]
            while st.finish_reason is None:
                st.add(await _next(self.its[k]))

        if len(self.its) == 1:
            await one(0)
            return
        async with asyncio.TaskGroup() as tg:
            for k in range(len(self.its)):
                tg.create_task(one(k))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            for it in self.its:
                try:
                    await it.aclose()  # type: ignore[attr-defined]
                except Exception as e:  # a backend's own cleanup failing: not the client's
                    log.warning("closing a backend stream failed: %r", e)
        finally:
            if self._tenant is not None:
                self._tenant.release()
            if self.on_close is not None:
                self.on_close()


async def _next(it: AsyncIterator[Piece]) -> Piece:
    try:
        return await anext(it)
    except StopAsyncIteration:
        raise StreamEndedError("the backend ended a stream before it finished") from None


async def _sse(shaper: Shaper, streams: Streams) -> AsyncIterator[bytes]:
    """The SSE body. An error after the response started is sent as an error event."""
    try:
        head = shaper.role_chunks()
        if head:
            yield head
        # aclosing: if the client leaves mid-stream, the merge's pending reads are cancelled
        # before Streams.close() closes the iterators they read.
        async with contextlib.aclosing(streams.pieces()) as pieces:
            async for k, piece in pieces:
                chunk = shaper.chunk(k, piece)
                if chunk is not None:
                    yield chunk
        if shaper.plan.include_usage:
            yield shaper.usage_chunk()
    except Exception as e:
        yield shaper.error_chunk(from_exception(_unwrap(e)))
    yield b"data: [DONE]\n\n"


# -- disconnects -------------------------------------------------------------------------------


async def _disconnected(receive: Receive) -> None:
    """Returns when the client has gone. A failing receive (a proxy's) counts as gone."""
    with contextlib.suppress(Exception):
        while (await receive())["type"] != "http.disconnect":
            pass


async def _until_disconnect(request: Request, work: Awaitable[Response]) -> Response:
    """Run work (which must not read the request) unless the client disconnects first; then
    cancel it, which closes its backend streams. The body must have been read already."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()  # its own cleanup (finally blocks) runs as it unwinds
    if not task.done():
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return Response(status_code=499)  # nobody is listening
    return task.result()


class SSEResponse(Response):
    """A text/event-stream response that stops, and runs `close`, as soon as the client
    disconnects, whichever ASGI server or proxy runs it. `close` always runs, exactly once,
    even when the body never started."""

    media_type = "text/event-stream"

    def __init__(self, chunks: AsyncIterator[bytes], close: Callable[[], Awaitable[None]]) -> None:
        self.chunks = chunks
        self._close = close
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stream = asyncio.ensure_future(self._stream(send))
        watch = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait((stream, watch), return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            stream.cancel()  # no-op when it finished
            # Shielded: the cleanup must finish even if this task is cancelled meanwhile.
            await asyncio.shield(asyncio.ensure_future(self._finish(stream)))

    async def _stream(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        async for chunk in self.chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _finish(self, stream: asyncio.Future) -> None:
        await asyncio.wait((stream,))
        if not stream.cancelled() and stream.exception() is not None:
            log.warning("stream ended early: %r", stream.exception())
        await self.chunks.aclose()  # type: ignore[attr-defined]
        await self._close()
