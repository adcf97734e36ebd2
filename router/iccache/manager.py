"""The example manager: what may become an example, in which scope, and cost-aware replay.

Admission: only a successful answer of the route's large model (finish_reason "stop": never
an error, never an answer cut at max_tokens or aborted), with a non-empty request and answer,
into the tenant's own scope, or the shared pool when the tenant opted in to sharing. A request
nearly identical to an example already there adds nothing and is skipped.

Replay (off-peak): the examples with the most reuse whose judged gain is low are asked of the
large model again; the new answer replaces the old when a judge prefers it.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from router.iccache.store import Example, ExampleStore

SHARED_SCOPE = "shared"
NEAR_DUPLICATE = 0.995


@dataclass(frozen=True)
class Admission:
    admitted: bool
    reason: str
    example_id: int | None = None


def scopes_for(tenant: str, shared_tenants: tuple[str, ...]) -> list[str]:
    """Where a tenant's requests may draw examples from: its own scope, plus the shared pool
    if it opted in. Never another tenant's."""
    own = tenant or "default"
    return [own, SHARED_SCOPE] if own in shared_tenants else [own]


def write_scope(tenant: str, shared_tenants: tuple[str, ...]) -> str:
    own = tenant or "default"
    return SHARED_SCOPE if own in shared_tenants else own


class ExampleManager:
    def __init__(self, store: ExampleStore, shared_tenants: tuple[str, ...] = ()) -> None:
        self.store = store
        self.shared_tenants = shared_tenants

    async def admit(
        self,
        *,
        tenant: str,
        request: str,
        response: str,
        emb: np.ndarray,
        model: str,
        large: str,
        finish_reason: str | None,
        tokens: int,
    ) -> Admission:
        if model != large:
            return Admission(False, f"answered by {model}, not the large model {large}")
        if finish_reason != "stop":
            return Admission(False, f"finish_reason {finish_reason!r}: not a complete answer")
        if not request.strip() or not response.strip():
            return Admission(False, "empty request or answer")
        scope = write_scope(tenant, self.shared_tenants)
        near = await self.store.search([scope], emb, 1)
        if near and near[0].similarity >= NEAR_DUPLICATE:
            return Admission(False, "a near-identical example is already stored")
        ex = Example(
            id=0, scope=scope, request=request, response=response, model=model,
            emb=np.asarray(emb, np.float32), tokens=tokens, created=time.time(),
        )  # fmt: skip
        ex = await self.store.add(ex)
        return Admission(True, "admitted", ex.id)

    async def replay(
        self,
        scope: str,
        regenerate: Callable[[Example], Awaitable[tuple[str, str | None, int]]],
        prefer_new: Callable[[Example, str], Awaitable[bool]],
        budget: int,
        gain_below: float = 0.5,
    ) -> list[int]:
        """Re-ask up to `budget` examples (most reused first, judged gain below gain_below);
        regenerate(example) -> (answer, finish_reason, tokens) asks its model again;
        prefer_new(example, answer) is the judge. Returns the ids whose answer was replaced."""
        exs = [e for e in await self.store.examples(scope) if e.mean_gain < gain_below]
        exs.sort(key=lambda e: (e.uses, -e.id), reverse=True)
        replaced = []
        for ex in exs[:budget]:
            answer, finish, tokens = await regenerate(ex)
            if finish != "stop" or not answer.strip() or answer == ex.response:
                continue
            if await prefer_new(ex, answer):
                await self.store.replace_response(scope, ex.id, answer, tokens)
                replaced.append(ex.id)
        return replaced
