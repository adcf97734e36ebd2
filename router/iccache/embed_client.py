"""The router's client of the embedding replicas (services/embed.py): a fixed address, or the
live replicas of role "embed" in the service registry, tried in turn."""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np

from kvstore.registry import list_replicas
from protos.splitserve.v1 import embed_pb2, embed_pb2_grpc
from rpc.channel import insecure_channel

EMBED_TIMEOUT_S = 30.0


class EmbedUnavailableError(RuntimeError):
    """No embedding replica answered (HTTP 503)."""


class EmbedClient:
    """Make it inside the event loop that uses it."""

    def __init__(
        self,
        address: str | None = None,
        redis_url: str | None = None,
        namespace: str = "splitserve",
        model: str = "all-minilm-l6-v2",
        refresh_s: float = 2.0,
    ) -> None:
        if address is None and redis_url is None:
            raise ValueError("an embed client needs an address or the registry's Redis URL")
        self.address, self.redis_url, self.namespace = address, redis_url, namespace
        self.model, self.refresh_s = model, refresh_s
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._listed: tuple[float, list[str]] = (0.0, [])
        self._next = 0

    async def _addresses(self, wait_s: float = 10.0) -> list[str]:
        if self.address is not None:
            return [self.address]
        deadline = time.monotonic() + wait_s
        while True:
            at, addrs = self._listed
            if not addrs or time.monotonic() - at > self.refresh_s:
                reps = await asyncio.to_thread(
                    list_replicas, self.redis_url, "embed", self.model, self.namespace
                )
                addrs = [r.address for r in reps]
                self._listed = (time.monotonic(), addrs)
            if addrs or time.monotonic() >= deadline:
                return addrs
            await asyncio.sleep(0.5)

    def _stub(self, address: str) -> embed_pb2_grpc.EmbedStub:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = insecure_channel(address)
        return embed_pb2_grpc.EmbedStub(ch)

    async def embed(self, texts: list[str]) -> np.ndarray:
        """[len(texts), dim] float32 rows of norm 1."""
        addrs = await self._addresses()
        if not addrs:
            raise EmbedUnavailableError(f"no embedding replica of {self.model} is registered")
        last: Exception | None = None
        for k in range(len(addrs)):
            address = addrs[(self._next + k) % len(addrs)]
            try:
                resp = await self._stub(address).Embed(
                    embed_pb2.EmbedRequest(texts=texts), timeout=EMBED_TIMEOUT_S
                )
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    raise ValueError(e.details()) from None
                last = e
                continue
            self._next = (self._next + k + 1) % len(addrs)
            return np.frombuffer(resp.vectors, "<f4").reshape(len(texts), resp.dim).copy()
        raise EmbedUnavailableError(f"no embedding replica answered: {last}")

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()
