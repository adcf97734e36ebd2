"""Off-peak replay, IC-Cache's cost-aware refinement of its examples: while the large models
are quiet, ask again the most reused examples whose judged gain is low, and keep a new answer
only when the large model, as judge, prefers it to the stored one.

The judge sees both answers twice, in both orders, and its preference is the difference of
its log odds of "A" over "B" between the two prompts, so a bias for a position cancels; a
tie keeps the old answer. Each router replica runs its own loop (`replay_interval_s` > 0);
the examples it replaces are replaced in Redis for every replica.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Protocol

from router.iccache.cache import ICCache
from router.iccache.store import Example
from rpc.piece import Piece, gather
from services.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)

JUDGE_SYSTEM = (
    "You compare two answers to the same question. Reply with the letter of the better "
    "answer only: A or B."
)
ABSENT_LOGPROB = -50.0  # a letter outside the judge's top alternatives


class Generates(Protocol):
    def generate(self, model: str, prompt_ids: list[int], params: SamplingParams,
                 request_id: str) -> AsyncIterator[Piece]: ...  # fmt: skip


def judge_messages(question: str, a: str, b: str) -> list[dict]:
    user = f"Question: {question}\nAnswer A: {a}\nAnswer B: {b}\nWhich answer is better, A or B?"
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


def log_odds(top: Mapping[int, float], a_id: int, b_id: int) -> float:
    """The judge's log odds of "A" over "B" as its first token."""
    return top.get(a_id, ABSENT_LOGPROB) - top.get(b_id, ABSENT_LOGPROB)


def preference(first: Mapping[int, float], second: Mapping[int, float], ids: tuple[int, int]):
    """> 0: the judge prefers the answer shown as A in the first prompt (and as B in the
    second); 0: no preference."""
    return log_odds(first, *ids) - log_odds(second, *ids)


class Replayer:
    def __init__(self, ic: ICCache, backend: Generates, tokenizers: Mapping) -> None:
        self.ic = ic
        self.backend = backend
        self.tokenizers = tokenizers
        self.budget = ic.config.replay_budget
        self.max_tokens = ic.config.replay_max_tokens

    async def _ask(self, model: str, messages: list[dict], params: SamplingParams) -> Piece:
        ids = self.tokenizers[model].apply_chat_template(messages)
        rid = f"icc-replay-{uuid.uuid4().hex[:12]}"
        return await gather(self.backend.generate(model, ids, params, rid))

    async def regenerate(self, ex: Example) -> tuple[str, str | None, int]:
        params = SamplingParams(max_tokens=self.max_tokens, temperature=0.0)
        out = await self._ask(ex.model, [{"role": "user", "content": ex.request}], params)
        return out.text, out.finish_reason, self.ic.count_tokens(ex.request) + len(out.token_ids)

    async def prefer_new(self, ex: Example, new: str) -> bool:
        tok = self.tokenizers[ex.model]
        ids = (tok.encode("A")[-1], tok.encode("B")[-1])
        params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=20)
        first, second = await asyncio.gather(
            self._ask(ex.model, judge_messages(ex.request, new, ex.response), params),
            self._ask(ex.model, judge_messages(ex.request, ex.response, new), params),
        )
        tops = [
            {t.token_id: t.logprob for t in p.logprobs[0].top} if p.logprobs else {}
            for p in (first, second)
        ]
        return preference(tops[0], tops[1], ids) > 0

    def quiet(self) -> bool:
        """Every IC-Cache route's large model below the load at which replay yields."""
        c = self.ic.config
        return all(self.ic.load.ema[r.large] < c.replay_below_load for r in c.routes)

    async def run_once(self) -> dict[str, list[int]]:
        """One pass over every scope (while the large models stay quiet): the ids replaced."""
        out: dict[str, list[int]] = {}
        for scope in sorted(await self.ic.store.scopes()):
            if not self.quiet():
                break
            out[scope] = await self.ic.manager.replay(
                scope, self.regenerate, self.prefer_new, self.budget
            )
        return out

    async def run(self, interval_s: float) -> None:
        """Replay every interval_s until cancelled; a failed pass is logged and retried at
        the next interval (a replica may be restarting)."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                replaced = await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("IC-Cache replay pass failed: %s", e)
                continue
            if any(replaced.values()):
                log.info("IC-Cache replay replaced examples %s", replaced)
