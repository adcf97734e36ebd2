"""The KV store as the engine's tier behind its swap space (services/engine/kv_tier.py): a
decode replica's prompt blocks came from the store, so after a preemption they are fetched
from it again instead of being swapped to host memory or recomputed.

The engine asks from its own thread; the fetch runs on the replica's event loop, where the
store client's channels live, and answers through a future."""

from __future__ import annotations

import asyncio
from concurrent.futures import Future

from kvstore.client import KVStoreClient
from services.engine.block_hash import BlockHash
from services.engine.kv_transfer import KVBlock, KVLayout
from services.wire import stored_to_kv


class StoreTier:
    def __init__(
        self,
        kv: KVStoreClient,
        loop: asyncio.AbstractEventLoop,
        model_id: str,
        layout: KVLayout,
        timeout_s: float = 30.0,
    ) -> None:
        self.kv = kv
        self.loop = loop
        self.model_id = model_id
        self.layout = layout
        # A fetch slower than this is given up: the blocks are recomputed instead.
        self.timeout_s = timeout_s

    def fetch(self, hashes: list[BlockHash]) -> Future[list[KVBlock | None]]:
        return asyncio.run_coroutine_threadsafe(self._fetch(hashes), self.loop)

    async def _fetch(self, hashes: list[BlockHash]) -> list[KVBlock | None]:
        ids = [bytes(h) for h in hashes]
        res = await asyncio.wait_for(self.kv.get(ids), self.timeout_s)
        out: list[KVBlock | None] = []
        for bid in ids:
            s = res.blocks.get(bid)
            out.append(stored_to_kv(s, self.model_id, self.layout) if s is not None else None)
        return out
