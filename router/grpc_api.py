"""The router's gRPC API: `splitserve.v1.Generate`, server streaming, for gRPC clients.

Same backend, tokenizers and tenants as the HTTP API; the API key travels as metadata
`authorization: Bearer <key>`. A tenant's concurrency and queue limits count its HTTP and gRPC
requests together (one Tenants object): over them, RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any, Protocol

import grpc

from protos.splitserve.v1 import generate_pb2 as pb
from protos.splitserve.v1 import generate_pb2_grpc as pb_grpc
from router.tenants import Tenant, TenantBusyError, Tenants, priority_levels_of
from rpc.sampling import sampling_fields
from services.engine.sampling_params import SamplingDefaults, SamplingParams

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generate"].full_name

_CODES = {
    "INVALID_ARGUMENT": grpc.StatusCode.INVALID_ARGUMENT,
    "RESOURCE_EXHAUSTED": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "UNAVAILABLE": grpc.StatusCode.UNAVAILABLE,
    "NOT_FOUND": grpc.StatusCode.NOT_FOUND,
}


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
    ) -> None:
        """tenants None: authentication off (the local demo). defaults: per model, the
        sampling a request gets for the fields it leaves unset."""
        self.backend = backend
        self.tokenizers = tokenizers
        self.tenants = tenants
        self.defaults = defaults or {}

    async def Generate(self, request, context):
        tenant: Tenant | None = None
        if self.tenants is not None:
            md = dict(context.invocation_metadata() or ())
            auth = md.get("authorization", "")
            key = auth[7:].strip() if auth.lower().startswith("bearer ") else None
            tenant = self.tenants.lookup(key)
            if tenant is None:
                await context.abort(
                    grpc.StatusCode.UNAUTHENTICATED,
                    "missing or invalid API key: send metadata 'authorization: Bearer <key>'",
                )
        request_args = await self._validate(request, context)
        if tenant is not None:
            try:
                await tenant.acquire()
            except TenantBusyError as e:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        try:
            async for msg in self._stream(*request_args, tenant, context):
                yield msg
        finally:
            if tenant is not None:
                tenant.release()

    async def _validate(self, request, context):
        """(model, prompt ids, params, request id, priority or None), or the call aborted with
        the reason."""
        models = dict(self.backend.models())
        model = request.model or (next(iter(models)) if len(models) == 1 else "")
        if model not in models:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"unknown model {request.model!r}; served: {', '.join(models)}",
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
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if len(prompt) + params.max_tokens > models[model]:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                f"context length {models[model]}",
            )
        priority = request.priority if request.HasField("priority") else None
        levels = priority_levels_of(self.tenants)
        if priority is not None and priority >= levels:
            await context.abort(
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
            await context.abort(_CODES.get(e.code().name, grpc.StatusCode.INTERNAL), e.details())
        except RuntimeError as e:  # no replica up, or none left to resume on (router.migration)
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
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
