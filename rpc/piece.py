"""The streamed token piece: one step of a request as a caller sees it, whichever service
produced it (prefill's first token, decode's stream, the router's Generate)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from protos.splitserve.v1 import common_pb2 as cpb


@dataclass
class Piece:
    token_ids: list[int]
    text: str
    logprobs: list[cpb.TokenLogprob] = field(default_factory=list)
    finish_reason: str = ""  # set on the last piece only
    usage: cpb.Usage | None = None  # with finish_reason
    prefill_timings: cpb.Timings | None = None  # disaggregated: the prefill's stages
    decode_timings: cpb.Timings | None = None  # on the first piece that decode sent

    def merge(self, later: Piece) -> None:
        """Append a later piece of the same request (gathering a whole response)."""
        self.token_ids += later.token_ids
        self.text += later.text
        self.logprobs += later.logprobs
        self.finish_reason = later.finish_reason or self.finish_reason
        self.usage = later.usage or self.usage
        self.prefill_timings = self.prefill_timings or later.prefill_timings
        self.decode_timings = self.decode_timings or later.decode_timings


async def gather(pieces: AsyncIterator[Piece]) -> Piece:
    """A whole response: a stream's pieces merged into one."""
    out = Piece([], "")
    async for p in pieces:
        out.merge(p)
    return out
