"""The router's prefill/decode client: prefill on one replica, then decode on another with the
returned block references, streaming tokens as they come (DistServe's two hops).

    async with PDClient(prefill="127.0.0.1:5001", decode="127.0.0.1:5002") as pd:
        async for piece in pd.generate(prompt_ids, SamplingParams(max_tokens=32)):
            print(piece.text, end="")

With only `decode` given (a colocated server), the whole request goes there. The hops are also
called one at a time (`prefill_first`, `decode_from`): the router resumes a request whose decode
replica was lost with `decode_from(call, handoff, resume=tokens delivered)` on another one.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import grpc

from protos.splitserve.v1 import common_pb2 as cpb
from protos.splitserve.v1 import decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from rpc.channel import insecure_channel
from rpc.piece import Piece, gather
from rpc.sampling import Sampling, sampling_to_pb


@dataclass(frozen=True)
class Call:
    """One request as both hops send it."""

    prompt_ids: list[int]
    params: Sampling
    request_id: str
    tenant: str = ""
    priority: int = 0
    cache_salt: str = ""

    @property
    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        # The tenant rides as metadata so every service can label its metrics with it.
        return (("x-splitserve-tenant", self.tenant),) if self.tenant else None


@dataclass(frozen=True)
class Handoff:
    """What prefill leaves for decode: the first token, the prompt's blocks in the KV store,
    the pin that holds them until decode pulls them, and the prefill's stage timings."""

    first_token_id: int
    blocks: list[cpb.BlockRef]
    pin_id: str
    holder_address: str
    timings: cpb.Timings


class PDClient:
    def __init__(
        self, decode: str, prefill: str | None = None, model: str = "", timeout_s: float = 600
    ) -> None:
        self.model = model
        self.timeout_s = timeout_s
        self._channels = []
        self.decode = decode_pb2_grpc.DecodeStub(self._channel(decode))
        self.prefill = prefill_pb2_grpc.PrefillStub(self._channel(prefill)) if prefill else None

    def _channel(self, address: str) -> grpc.aio.Channel:
        ch = insecure_channel(address)
        self._channels.append(ch)
        return ch

    async def close(self) -> None:
        for ch in self._channels:
            await ch.close()

    async def __aenter__(self) -> PDClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def generate(
        self,
        prompt_ids: list[int],
        params: Sampling,
        request_id: str | None = None,
        tenant: str = "",
        priority: int = 0,
        cache_salt: str = "",
    ) -> AsyncIterator[Piece]:
        """Stream a request. cache_salt: the request's cache scope (its blocks are named
        under it on both hops). gRPC errors (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, UNAVAILABLE)
        propagate as grpc.aio.AioRpcError. Closing the iterator early cancels the decode stream,
        which aborts the sequence on the decode server."""
        req = Call(prompt_ids, params, request_id or uuid.uuid4().hex, tenant, priority,
                   cache_salt)  # fmt: skip
        handoff = None
        if self.prefill is not None:
            first, handoff = await self.prefill_first(req)
            yield first
            if handoff is None:
                return
        async for piece in self.decode_from(req, handoff):
            yield piece

    async def prefill_first(self, req: Call) -> tuple[Piece, Handoff | None]:
        """The prefill hop: the first token, and where its KV waits for decode (None when the
        first token ended the request)."""
        assert self.prefill is not None, "a client without a prefill server"
        pre = await self.prefill.Prefill(
            prefill_pb2.PrefillRequest(
                request_id=req.request_id, model=self.model, prompt_token_ids=req.prompt_ids,
                sampling=sampling_to_pb(req.params), priority=req.priority,
                cache_salt=req.cache_salt,
            ),
            timeout=self.timeout_s,
            metadata=req.metadata,
        )  # fmt: skip
        first = Piece(
            [pre.first_token_id],
            pre.first_text,
            [pre.first_logprob] if pre.HasField("first_logprob") else [],
            pre.finish_reason,
            pre.usage if pre.finish_reason else None,
            pre.timings,
        )
        if pre.finish_reason:
            return first, None
        handoff = Handoff(
            pre.first_token_id, list(pre.blocks), pre.pin_id, pre.holder_address, pre.timings
        )
        return first, handoff

    async def decode_from(
        self, req: Call, handoff: Handoff | None = None, resume: Sequence[int] = ()
    ) -> AsyncIterator[Piece]:
        """The decode hop: after a prefill's hand-off, or (resume: the tokens already
        delivered) continuing a request whose decode replica was lost, from the prompt's KV
        where the hand-off left it (recomputed where it is gone). Neither: a colocated server
        computes the whole request."""
        dreq = decode_pb2.DecodeRequest(
            request_id=req.request_id, model=self.model, prompt_token_ids=req.prompt_ids,
            sampling=sampling_to_pb(req.params), priority=req.priority,
            cache_salt=req.cache_salt, resume_token_ids=list(resume),
        )  # fmt: skip
        prefill_timings = None
        if handoff is not None:
            if not resume:
                dreq.first_token_id = handoff.first_token_id
            dreq.blocks.extend(handoff.blocks)
            dreq.pin_id = handoff.pin_id
            dreq.pin_holder_address = handoff.holder_address
            prefill_timings = handoff.timings
        call = self.decode.Decode(dreq, timeout=self.timeout_s, metadata=req.metadata)
        try:
            async for msg in call:
                yield Piece(
                    list(msg.token_ids),
                    msg.text,
                    list(msg.logprobs),
                    msg.finish_reason,
                    msg.usage if msg.finish_reason else None,
                    prefill_timings,
                    msg.timings if msg.HasField("timings") else None,
                )
        finally:
            call.cancel()  # no-op when the stream already ended

    async def complete(self, prompt_ids: list[int], params: Sampling) -> Piece:
        """The whole request gathered into one Piece."""
        return await gather(self.generate(prompt_ids, params))
