"""The OpenAI-compatible HTTP API as a FastAPI app over an injected backend (Ray Serve wraps it;
tests serve it with uvicorn).

    app = build_app(backend, {"tiny": load_tokenizer(d)}, Tenants.load("tenants.yaml"))

A request goes: API key -> tenant; body (size-capped) -> validated request -> Plan (prompt ids,
sampling parameters per choice); a tenant slot and a router slot (router.admission: 429 with
Retry-After past either's limits); one backend stream per choice; then a JSON
response or an SSE stream. Streams are primed (first piece awaited) before the response starts,
so the backend's refusals still become HTTP statuses. A client that goes away, before or during
the response, closes every backend stream (which aborts the request on its replica) and frees
the tenant's and the router's admission slots.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from router import errors, openapi
from router.admission import Gate, GateBusyError
from router.config import DEFAULT_MAX_BODY_BYTES
from router.errors import APIError, from_exception
from router.metrics import RouterMetrics
from router.openai_api import Kind, Plan, Shaper, TokenTexts, parse, plan, prompts_of, text_length
from router.schemas import ChatCompletionRequest, CompletionRequest
from router.streaming import SSEResponse, Streams, sse_chunks, until_disconnect, unwrap
from router.tenants import Tenant, Tenants, priority_levels_of
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
    when no replica serves the model (or, PoolBackend, none is left to resume a request whose
    replica was lost: router.migration). `tenant` names the caller ("" with auth off);
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
    admission: Gate | None = None,
) -> FastAPI:
    """tenants=None turns authentication off (the local demo only). GET /metrics serves
    `metrics` (a fresh RouterMetrics when not given). defaults: per model, the sampling a
    request gets for what it leaves unset (the built-in SamplingDefaults otherwise).
    iccache: IC-Cache's routes (router.iccache) and POST /v1/feedback. admission: the router's
    gate over all its requests (router.admission; shared with the gRPC service), None: the
    tenants' limits only."""
    defaults = defaults or {}
    priority_levels = priority_levels_of(tenants)
    texts = {name: TokenTexts(tok) for name, tok in tokenizers.items()}
    metrics = metrics or RouterMetrics(tenants)
    app = FastAPI(title="splitserve", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    _install_error_handlers(app)
    openapi.install(app, auth=tenants is not None)

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
        return await until_disconnect(request, run(p, shaper, tenant, decision))

    async def admit(tenant: Tenant | None) -> None:
        """The tenant's slot, then the router's: 429 past either (the tenant's slot given back
        when the router refuses, or the client leaves while queued)."""
        try:
            if tenant is not None:
                await tenant.acquire()
        except GateBusyError as e:
            raise errors.too_many_requests(str(e)) from None
        if admission is None:
            return
        try:
            await admission.acquire()
        except BaseException as e:
            if tenant is not None:
                tenant.release()
            if isinstance(e, GateBusyError):
                raise errors.too_many_requests(str(e)) from None
            raise

    async def run(
        p: Plan, shaper: Shaper, tenant: Tenant | None, decision: Decision | None = None
    ) -> Response:
        await admit(tenant)
        streams = Streams(tenant)  # frees the tenant's slot on close; on_close the rest
        closers: list[Callable[[], None]] = [admission.release] if admission is not None else []

        def on_close() -> None:
            for close in closers:
                close()

        streams.on_close = on_close
        handed_over = False
        ic_headers: dict[str, str] = {}
        if decision is not None:
            from router.iccache import http as ic_http

            assert iccache is not None
            ic_headers = ic_http.headers(decision)
            iccache.load.start(p.model)
            closers.append(lambda: iccache.load.end(p.model))
        try:
            streams.open(backend, p)
            if p.stream:
                await streams.prime()
                handed_over = True  # the SSE response closes them now
                sse = SSEResponse(sse_chunks(shaper, streams), streams.close)
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
            raise from_exception(unwrap(e)) from None
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
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise errors.payload_too_large(limit)
            parts.append(chunk)
    except ClientDisconnect:  # gone mid-body: nobody to answer, and not the server's failure
        raise errors.client_closed() from None
    return b"".join(parts)
