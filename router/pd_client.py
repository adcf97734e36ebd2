"""The router's prefill/decode client: prefill on one replica, then decode on another with the
returned block references, streaming tokens as they come (DistServe's two hops).

    async with PDClient(prefill="127.0.0.1:5001", decode="127.0.0.1:5002") as pd:
        async for piece in pd.generate(prompt_ids, SamplingParams(max_tokens=32)):
            print(piece.text, end="")

With only `decode` given (a colocated server), the whole request goes there.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import grpc

from protos.splitserve.v1 import decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from rpc.channel import insecure_channel
from rpc.piece import Piece
from rpc.sampling import Sampling, sampling_to_pb


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
        rid = request_id or uuid.uuid4().hex
        sampling = sampling_to_pb(params)
        # The tenant rides as metadata so every service can label its metrics with it.
        md = (("x-splitserve-tenant", tenant),) if tenant else None
        dreq = decode_pb2.DecodeRequest(
            request_id=rid, model=self.model, prompt_token_ids=prompt_ids, sampling=sampling,
            priority=priority, cache_salt=cache_salt,
        )  # fmt: skip
        prefill_timings = None
        if self.prefill is not None:
            pre = await self.prefill.Prefill(
                prefill_pb2.PrefillRequest(
                    request_id=rid, model=self.model, prompt_token_ids=prompt_ids,
                    sampling=sampling, priority=priority, cache_salt=cache_salt,
                ),
                timeout=self.timeout_s,
                metadata=md,
            )  # fmt: skip
            first = Piece(
                [pre.first_token_id],
                pre.first_text,
                [pre.first_logprob] if pre.HasField("first_logprob") else [],
                pre.finish_reason,
                pre.usage if pre.finish_reason else None,
                pre.timings,
            )
            yield first
            if pre.finish_reason:
                return
            dreq.first_token_id = pre.first_token_id
            dreq.blocks.extend(pre.blocks)
            dreq.pin_id = pre.pin_id
            dreq.pin_holder_address = pre.holder_address
            prefill_timings = pre.timings
        call = self.decode.Decode(dreq, timeout=self.timeout_s, metadata=md)
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
        out = Piece([], "")
        async for p in self.generate(prompt_ids, params):
            out.merge(p)
        return out
