"""splitserve's gRPC `Generate` client for replay: server streaming, the API key as metadata
`authorization: Bearer KEY`. Prompts go as token ids, text, or one chat message, as planned.

A message that carries token ids is a token piece; the last message's `usage` gives the exact
counts.
"""

from __future__ import annotations

import asyncio
import time

import grpc

from loadgen.outcome import Done, Outcome
from loadgen.workload import Planned
from protos.splitserve.v1 import common_pb2 as cpb
from protos.splitserve.v1 import generate_pb2 as pb
from protos.splitserve.v1 import generate_pb2_grpc as pb_grpc

perf = time.perf_counter


class GrpcClient:
    def __init__(
        self,
        target: str,
        model: str,
        chat: bool = False,
        timeout_s: float = 600.0,
        ignore_eos: bool = True,
        temperature: float | None = None,
    ) -> None:
        self.target = target.removeprefix("grpc://")
        self.model, self.chat, self.timeout_s = model, chat, timeout_s
        self.ignore_eos, self.temperature = ignore_eos, temperature
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.GenerateStub | None = None
        self._tasks: set[asyncio.Task] = set()
        self.connections_opened = 0

    def request(self, p: Planned) -> pb.GenerateRequest:
        sp = cpb.SamplingParams(max_tokens=p.max_tokens, ignore_eos=self.ignore_eos)
        if self.temperature is not None:
            sp.temperature = self.temperature
        req = pb.GenerateRequest(model=self.model, sampling=sp, request_id=f"loadgen-{p.index}")
        if p.priority is not None:
            req.priority = p.priority
        if self.chat:
            req.chat.messages.add(role="user", content=p.prompt.text)
        elif p.prompt.ids is not None:
            req.prompt_token_ids.ids.extend(p.prompt.ids)
        else:
            req.prompt = p.prompt.text
        return req

    async def open(self, connections: int) -> None:
        """One HTTP/2 channel multiplexes every stream; `connections` does not apply."""
        self._channel = grpc.aio.insecure_channel(
            self.target, options=[("grpc.max_receive_message_length", 64 << 20)]
        )
        try:
            await asyncio.wait_for(self._channel.channel_ready(), min(self.timeout_s, 30.0))
        except TimeoutError:
            await self._channel.close()
            raise OSError(f"cannot reach the gRPC endpoint {self.target}") from None
        self._stub = pb_grpc.GenerateStub(self._channel)
        self.connections_opened = 1

    def submit(self, p: Planned, out: Outcome, done: Done) -> None:
        task = asyncio.get_running_loop().create_task(self._run(p, out, done))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, p: Planned, out: Outcome, done: Done) -> None:
        assert self._stub is not None
        md = (("authorization", f"Bearer {p.api_key}"),) if p.api_key else None
        req = self.request(p)
        out.sent = perf()
        try:
            call = self._stub.Generate(req, metadata=md, timeout=self.timeout_s)
            async for msg in call:
                now = perf()
                if msg.token_ids:
                    out.piece(now)
                if msg.HasField("usage"):
                    out.output_tokens = msg.usage.completion_tokens
                    out.prompt_tokens = msg.usage.prompt_tokens or out.prompt_tokens
                out.end = now
            if not out.output_tokens:
                out.output_tokens = len(out.chunk_times)
            if not out.chunk_times:
                out.error = "the stream ended without tokens"
        except grpc.aio.AioRpcError as e:
            out.error = f"{e.code().name}: {e.details()}"
        except asyncio.CancelledError:
            out.error = "cancelled"
            raise
        finally:
            done(out)

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._channel is not None:
            await self._channel.close()
