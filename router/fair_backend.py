"""A backend that admits each sequence through fair admission (router.vtc) before it reaches
the pools, charges its tenant as the tokens come, and gives it an engine priority.

The priority a sequence carries to the engines (lower runs first, and is preempted last): the
one the request asked for, else its tenant's standing (how many backlogged tenants have
received less service), never better than the tenant's configured best."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from router.vtc import VTC
from rpc.piece import Piece


class FairBackend:
    def __init__(self, inner: Any, vtc: VTC) -> None:
        self.inner = inner
        self.vtc = vtc

    def models(self) -> list[tuple[str, int]]:
        return self.inner.models()

    def __getattr__(self, name: str) -> Any:  # the inner backend's other parts (placement...)
        return getattr(self.inner, name)

    async def close(self) -> None:
        await self.vtc.close()
        close = getattr(self.inner, "close", None)
        if close is not None:
            await close()

    async def generate(
        self,
        model: str,
        prompt_ids: list[int],
        params: Any,
        request_id: str,
        tenant: str = "",
        priority: int | None = None,
        **kw: Any,
    ) -> AsyncIterator[Piece]:
        cfg = self.vtc.cfg
        async with self.vtc.admit(tenant, len(prompt_ids)) as slot:
            prio = slot.priority if priority is None else priority
            prio = max(prio, cfg.priorities.get(tenant, 0))
            gen = self.inner.generate(
                model, prompt_ids, params, request_id, tenant=tenant, priority=prio, **kw
            )
            try:
                async for piece in gen:
                    slot.output(len(piece.token_ids))
                    if piece.usage is not None:
                        slot.cached(piece.usage.cached_tokens)
                    yield piece
            finally:
                await gen.aclose()
