"""IC-Cache as the router uses it: for a request to an IC-Cache route, embed it, select
examples of the caller's scope, let the bandit pick the arm, and hand back the model to run
and the messages to send (examples as prior turns). Once answered, admit a large-model answer
as an example and keep what the feedback for this response id will need (in Redis, so any
router replica can take the feedback).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import redis.asyncio as aioredis

from router.iccache.bandit import ContextualBandit, context, own_estimate_prior
from router.iccache.config import ARMS, ICCacheConfig, ICRoute
from router.iccache.embed_client import EmbedClient
from router.iccache.load import LoadWatch, load_penalty
from router.iccache.manager import Admission, ExampleManager, scopes_for, write_scope
from router.iccache.outcomes import Estimate, OutcomeMemory
from router.iccache.selector import Chosen, Selector
from router.iccache.store import ExampleStore

SMALL_EX, SMALL, LARGE = ARMS


class UnknownResponseError(KeyError):
    """No response of this tenant with that id awaits feedback."""


@dataclass
class Decision:
    route: ICRoute
    tenant: str
    arm: str
    query: str
    emb: np.ndarray
    x: np.ndarray  # the bandit's context
    chosen: list[Chosen] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)

    @property
    def model(self) -> str:
        return self.route.large if self.arm == LARGE else self.route.small

    @property
    def examples(self) -> list[Chosen]:
        return self.chosen if self.arm == SMALL_EX else []

    def messages(self, messages: list[dict]) -> list[dict]:
        """The request's messages with the examples as earlier user/assistant turns (after
        any leading system message)."""
        head = [m for m in messages[:1] if m["role"] in ("system", "developer")]
        shots = []
        for c in self.examples:
            ex = c.hit.example
            shots += [
                {"role": "user", "content": ex.request},
                {"role": "assistant", "content": ex.response},
            ]
        return head + shots + messages[len(head) :]

    def usage(self) -> dict:
        return {"route": self.route.name, "model": self.model, "arm": self.arm,
                "examples": len(self.examples)}  # fmt: skip


def outcome_key(route: str, arm: str) -> str:
    return f"{route}/{arm}"


def query_text(messages: list[dict]) -> str:
    """What a request is about: its last user message."""
    for m in reversed(messages):
        if m["role"] == "user":
            return m["content"]
    return messages[-1]["content"] if messages else ""


class ICCache:
    """Make it inside the event loop that uses it."""

    def __init__(
        self,
        config: ICCacheConfig,
        redis_url: str,
        namespace: str,
        dim: int | None = None,
        embed: EmbedClient | None = None,
        count_tokens: Callable[[str], int] | None = None,
    ) -> None:
        self.config = config
        self.embed = embed or EmbedClient(
            config.embed_address, redis_url, namespace, config.embed_model
        )
        dim = dim or config.embed_dim
        self.store = ExampleStore(redis_url, namespace, dim, config.capacity_bytes)
        self.manager = ExampleManager(self.store, config.shared_tenants)
        self.selector = Selector(config.max_examples, config.min_similarity, config.token_cost)
        self.outcomes = OutcomeMemory(
            redis_url, namespace, dim, config.outcome_capacity, config.outcome_neighbours,
            config.outcome_pseudo_count,
        )  # fmt: skip
        self.bandit = ContextualBandit(
            ARMS, own_estimate_prior(config.arm_costs), config.bandit, config.alpha,
            ridge=config.bandit_ridge, seed=config.seed,
        )  # fmt: skip
        self.load = LoadWatch(config.load_ema)
        self.count_tokens = count_tokens or (lambda s: max(1, len(s) // 4))
        self.r = aioredis.Redis.from_url(redis_url)
        self.prefix = f"{namespace}:icc"

    @classmethod
    def for_router(cls, config: ICCacheConfig, redis_url: str, namespace: str,
                   tokenizers: dict) -> ICCache:  # fmt: skip
        """The router's: examples' prompt cost counted in the tokens of the first route's
        small model (the model that reads them)."""
        tok = tokenizers[config.routes[0].small]
        return cls(config, redis_url, namespace, count_tokens=lambda s: len(tok.encode(s)))

    async def close(self) -> None:
        await self.store.close()
        await self.outcomes.close()
        await self.embed.close()
        await self.r.aclose()

    def route(self, name: str) -> ICRoute | None:
        return self.config.routes_by_name.get(name)

    def offsets(self, route: ICRoute, est: dict[str, Estimate]) -> dict[str, float]:
        """Per arm: a bonus where it has little nearby evidence (optimism: a kind of request
        no arm has been judged on gets tried on each), and the large arm's load penalty."""
        c = self.config
        out = {a: c.outcome_explore / np.sqrt(e.evidence + c.outcome_pseudo_count)
               for a, e in est.items()}  # fmt: skip
        out[LARGE] -= load_penalty(self.load.ema[route.large], c.load_threshold, c.load_penalty)
        return out

    async def decide(self, route: ICRoute, tenant: str, messages: list[dict],
                     force_arm: str | None = None) -> Decision:  # fmt: skip
        """force_arm: skip the bandit (benchmarks' fixed policies; the examples are still
        selected for small+examples)."""
        query = query_text(messages)
        emb = (await self.embed.embed([query]))[0]
        scopes = scopes_for(tenant, self.config.shared_tenants)
        hits = await self.store.search(scopes, emb, self.config.candidates)
        chosen = self.selector.select(hits)
        max_sim = hits[0].similarity if hits else 0.0
        mean_u = float(np.mean([c.utility for c in chosen])) if chosen else 0.0
        chars = sum(len(m["content"]) for m in messages)
        # Outcomes are kept per route: two routes' "large" may be different models.
        priors = {outcome_key(route.name, a): p
                  for a, p in zip(ARMS, self.config.arm_priors, strict=True)}  # fmt: skip
        by_key = await self.outcomes.estimate(scopes, emb, priors)
        est = {a: by_key[outcome_key(route.name, a)] for a in ARMS}
        x = context(max_sim, mean_u, len(chosen), self.config.max_examples, chars,
                    tuple(est[a].mean for a in ARMS))  # fmt: skip
        allowed = (SMALL_EX, SMALL, LARGE) if chosen else (SMALL, LARGE)
        if force_arm is not None:
            arm, scores = (force_arm if force_arm in allowed else SMALL), {}
        else:
            arm, scores = self.bandit.choose(x, allowed, self.offsets(route, est))
        d = Decision(route, tenant, arm, query, emb, x, chosen, scores)
        if d.examples:
            for scope in {c.hit.example.scope for c in d.examples}:
                ids = [c.hit.example.id for c in d.examples if c.hit.example.scope == scope]
                await self.store.record_use(scope, ids)
        return d

    async def finish(
        self, d: Decision, response_id: str, text: str, finish_reason: str | None,
        completion_tokens: int,
    ) -> Admission:  # fmt: skip
        """After the response: keep the decision for feedback; admit a large answer."""
        record = {
            "tenant": d.tenant, "route": d.route.name, "arm": d.arm, "x": d.x.tolist(),
            "emb": base64.b64encode(np.asarray(d.emb, "<f4").tobytes()).decode(),
            "examples": [[c.hit.example.scope, c.hit.example.id, c.x.tolist()]
                         for c in d.examples],
        }  # fmt: skip
        await self.r.set(
            f"{self.prefix}:resp:{response_id}", json.dumps(record), ex=self.config.feedback_ttl_s
        )
        return await self.manager.admit(
            tenant=d.tenant, request=d.query, response=text, emb=d.emb, model=d.model,
            large=d.route.large, finish_reason=finish_reason,
            tokens=self.count_tokens(d.query) + completion_tokens,
        )  # fmt: skip

    async def feedback(self, tenant: str, response_id: str, score: float) -> dict:
        """score in [0, 1]: judged quality of the response. Trains the bandit (reward =
        score - the arm's cost), the utility model and the examples' gain statistics, and
        joins the tenant's judged outcomes."""
        raw = await self.r.getdel(f"{self.prefix}:resp:{response_id}")
        rec = json.loads(raw) if raw is not None else None
        if rec is None or rec["tenant"] != tenant:
            if rec is not None:  # not theirs: put it back untouched
                await self.r.set(f"{self.prefix}:resp:{response_id}", raw, keepttl=True)
            raise UnknownResponseError(response_id)
        arm = rec["arm"]
        reward = score - self.config.arm_costs[ARMS.index(arm)]
        self.bandit.update(arm, np.asarray(rec["x"]), reward)
        emb = np.frombuffer(base64.b64decode(rec["emb"]), "<f4")
        scope = write_scope(tenant, self.config.shared_tenants)
        await self.outcomes.record(scope, outcome_key(rec["route"], arm), emb, score)
        if rec["examples"]:
            self.selector.learn([np.asarray(e[2]) for e in rec["examples"]], score)
            for scope in {e[0] for e in rec["examples"]}:
                ids = [e[1] for e in rec["examples"] if e[0] == scope]
                await self.store.record_gain(scope, ids, score)
        return {"arm": arm, "reward": reward}
