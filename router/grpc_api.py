"""The router's gRPC API: `splitserve.v1.Generate`, server streaming, for gRPC clients.

Same backend, tokenizers and tenants as the HTTP API; the API key travels as metadata
`authorization: Bearer <key>`. A tenant's concurrency and queue limits count its HTTP and gRPC
requests together (one Tenants object), and so does the router's admission gate: over either,
RESOURCE_EXHAUSTED.

Register it with `add_to_server`: a request that is not a GenerateRequest (bytes cut short,
strings that are not UTF-8) then gets INVALID_ARGUMENT, not gRPC's UNKNOWN for a parse failure.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Protocol

import grpc
from google.protobuf.message import DecodeError

from protos.splitserve.v1 import generate_pb2 as pb
from protos.splitserve.v1 import generate_pb2_grpc as pb_grpc
from router.admission import Gate, GateBusyError
from router.tenants import Tenant, TenantBusyError, Tenants, priority_levels_of
from rpc.sampling import sampling_fields
from services.engine.sampling_params import SamplingDefaults, SamplingParams

if TYPE_CHECKING:
    from router.iccache.cache import ICCache

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generate"].full_name

_CODES = {
    "INVALID_ARGUMENT": grpc.StatusCode.INVALID_ARGUMENT,
    "RESOURCE_EXHAUSTED": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "UNAVAILABLE": grpc.StatusCode.UNAVAILABLE,
    "NOT_FOUND": grpc.StatusCode.NOT_FOUND,
}


# A status's details travel in a header (percent-encoded, up to 3 bytes per byte): echoing a
# client's megabyte-long model name would overflow the header limit and lose the status.
MAX_DETAILS_BYTES = 1024


async def _abort(context, code: grpc.StatusCode, details: str) -> None:
    raw = details.encode("utf-8", "replace")
    if len(raw) > MAX_DETAILS_BYTES:
        details = raw[: MAX_DETAILS_BYTES - 3].decode("utf-8", "ignore") + "..."
    await context.abort(code, details)


class Undecodable:
    """What arrived instead of a GenerateRequest, and why protobuf refused it."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def parse_request(data: bytes) -> pb.GenerateRequest | Undecodable:
    try:
        return pb.GenerateRequest.FromString(data)
    except DecodeError as e:
        return Undecodable(str(e))


def add_to_server(servicer: GenerateServicer, server) -> None:
    """The Generate service on `server` (grpc.aio), with requests parsed by parse_request."""
    handlers = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            servicer.Generate,
            request_deserializer=parse_request,
            response_serializer=pb.GenerateResponse.SerializeToString,
        )
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


class Backend(Protocol):
    def models(self) -> list[tuple[str, int]]: ...

    def generate(
        self, model: str, prompt_ids: list[int], params: Any, request_id: str, **kw: Any
    ) -> AsyncIterator[Any]: ...


class GenerateServicer(pb_grpc.GenerateServicer):
    def __init__(
        self,
        backend: Backend,
        tokenizers: dict[str, Any],
        tenants: Tenants | None,
        defaults: dict[str, SamplingDefaults] | None = None,
        admission: Gate | None = None,
        iccache: ICCache | None = None,
    ) -> None:
        """tenants None: authentication off (the local demo). defaults: per model, the
        sampling a request gets for the fields it leaves unset. admission: the router's gate
        (the HTTP app's too), after the tenant's. iccache: its routes (router.iccache)."""
        self.backend = backend
        self.iccache = iccache
        self.tokenizers = tokenizers
        self.tenants = tenants
        self.defaults = defaults or {}
        self.admission = admission

    async def Generate(self, request, context):
        tenant: Tenant | None = None
        if self.tenants is not None:
            md = dict(context.invocation_metadata() or ())
            auth = md.get("authorization", "")
            key = auth[7:].strip() if auth.lower().startswith("bearer ") else None
            tenant = self.tenants.lookup(key)
            if tenant is None:
                await _abort(
                    context,
                    grpc.StatusCode.UNAUTHENTICATED,
                    "missing or invalid API key: send metadata 'authorization: Bearer <key>'",
                )
        if isinstance(request, Undecodable):
            await _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the request is not a valid {pb.GenerateRequest.DESCRIPTOR.full_name}: "
                f"{request.reason}",
            )
        answer = None
        name = tenant.name if tenant is not None else ""
        route = self.iccache.route(request.model) if self.iccache is not None else None
        if route is not None and route.allows(name):  # another tenant's: as any unknown name
            answer, request = await self._ic_decide(request, name, context)
        request_args = await self._validate(request, context)
        if tenant is not None:
            try:
                await tenant.acquire()
            except TenantBusyError as e:
                await _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        admitted = loaded = False
        try:
            if self.admission is not None:
                try:
                    await self.admission.acquire()
                except GateBusyError as e:
                    await _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
                admitted = True
            if answer is not None:
                self.iccache.load.start(request_args[0])
                loaded = True
            async for msg in self._stream(*request_args, tenant, context):
                if answer is not None:
                    answer.add(msg)
                yield msg
            if answer is not None:
                await answer.finish(self.iccache)
        finally:
            if loaded:
                self.iccache.load.end(request_args[0])
            if admitted:
                self.admission.release()
            if tenant is not None:
                tenant.release()

    async def _ic_decide(self, request, tenant: str, context):
        """IC-Cache's choice for a route's request: (Answer, the request for the chosen model),
        its metadata sent; or the call aborted with the reason."""
        from router.iccache import grpc_edge as ic_grpc

        try:
            new, d = await ic_grpc.decide(self.iccache, request, tenant)
        except ic_grpc.Refusal as e:
            await _abort(context, e.code, e.details)
        # The server's own id, never the client's request_id: feedback records are keyed by it.
        answer = ic_grpc.Answer(d, f"gen-{uuid.uuid4().hex}")
        await context.send_initial_metadata(ic_grpc.metadata(d, answer.response_id))
        return answer, new

    async def _validate(self, request, context):
        """(model, prompt ids, params, request id, priority or None), or the call aborted with
        the reason."""
        models = dict(self.backend.models())
        model = request.model or (next(iter(models)) if len(models) == 1 else "")
        if model not in models:
            await _abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"unknown model {request.model[:200]!r}; served: {', '.join(models)}",
            )
        defaults = self.defaults.get(model) or SamplingDefaults()
        try:
            prompt = self._prompt(request, model)
            if not prompt:
                raise ValueError("the prompt is empty")
            # Unset max_tokens: the model's cap, at most the rest of the context.
            cap = max(1, min(defaults.max_tokens, models[model] - len(prompt)))
            fields = sampling_fields(request.sampling, default_max_tokens=cap)
            params = SamplingParams(**{**defaults.fields(), **fields})
        except ValueError as e:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if len(prompt) + params.max_tokens > models[model]:
            await _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                f"context length {models[model]}",
            )
        priority = request.priority if request.HasField("priority") else None
        levels = priority_levels_of(self.tenants)
        if priority is not None and priority >= levels:
            await _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"priority must be within [0, {levels}), got {priority}",
            )
        return model, prompt, params, request.request_id or uuid.uuid4().hex, priority

    async def _stream(self, model, prompt, params, rid, priority, tenant: Tenant | None, context):
        name, salt = (tenant.name, tenant.cache_salt) if tenant is not None else ("", "")
        gen = self.backend.generate(
            model, prompt, params, rid, tenant=name, priority=priority, cache_salt=salt
        )
        try:
            async for piece in gen:
                msg = pb.GenerateResponse(
                    token_ids=piece.token_ids, text=piece.text, logprobs=piece.logprobs
                )
                if piece.finish_reason:
                    msg.finish_reason = piece.finish_reason
                if piece.usage is not None:
                    msg.usage.CopyFrom(piece.usage)
                yield msg
        except grpc.aio.AioRpcError as e:
            await _abort(context, _CODES.get(e.code().name, grpc.StatusCode.INTERNAL), e.details())
        except RuntimeError as e:  # no replica up, or none left to resume on (router.migration)
            await _abort(context, grpc.StatusCode.UNAVAILABLE, str(e))
        finally:
            await gen.aclose()

    def _prompt(self, request, model: str) -> list[int]:
        kind = request.WhichOneof("input")
        tok = self.tokenizers[model]
        if kind == "prompt_token_ids":
            return [int(t) for t in request.prompt_token_ids.ids]
        if kind == "chat":
            msgs = [{"role": m.role, "content": m.content} for m in request.chat.messages]
            if not msgs:
                raise ValueError("chat has no messages")
            try:
                return tok.apply_chat_template(msgs)
            except Exception as e:
                raise ValueError(str(e)) from None
        if kind == "prompt":
            return tok.encode(request.prompt)
        raise ValueError("give one of prompt, prompt_token_ids or chat")
