"""The app config's `iccache:` section: which routes turn IC-Cache on (router.iccache), over
which of the config's models, for which tenants; the embedding replica; the store's capacity
and the sharing scope.

    iccache:
      routes:
        - name: auto                          # the model name clients ask for
          small: smollm2-135m-instruct        # names of models in `models:`
          large: qwen2.5-coder-0.5b-instruct
          tenants: []                         # who may use it; empty: every tenant
      embed: {model: all-minilm-l6-v2, replicas: 1, num_cpus: 0, threads: 0}
      capacity: 20MiB                         # per scope (a tenant, or the shared pool)
      shared_tenants: []                      # opted in to the shared pool; others stay private
      bandit: linucb                          # or thompson
      # optional knobs, ICCacheConfig's defaults when unset: candidates, max_examples,
      # min_similarity, token_cost, alpha, arm_costs, arm_priors, load_threshold,
      # load_penalty, load_ema, feedback_ttl_s, outcome_capacity, outcome_neighbours,
      # outcome_pseudo_count, outcome_explore, bandit_ridge, replay_interval_s (0: off),
      # replay_below_load, replay_budget, replay_max_tokens

The rules of each knob are ICCacheConfig's (checked by building one), so a bad value is an
error naming the field, as in the rest of the app config.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kvstore.sizes import parse_size
from router.iccache.config import ICCacheConfig, ICRoute

DEFAULT_EMBED_MODEL = "all-minilm-l6-v2"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EmbedSpec(_Strict):
    """The embedding replicas (services.embed; CPU). model: a known embedding model (pulled
    once from the package index) or a sentence-transformers directory."""

    model: str = Field(DEFAULT_EMBED_MODEL, min_length=1)
    replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0, ge=0)
    threads: int = Field(0, ge=0)  # torch threads; 0: every core

    @property
    def served_name(self) -> str:
        """The name the replicas register under (and the router looks up)."""
        from pathlib import Path

        from splitserve.embed_pull import EMBEDDERS

        return self.model if self.model in EMBEDDERS else Path(self.model).name


class ICRouteSpec(_Strict):
    name: str = Field(min_length=1)
    small: str = Field(min_length=1)
    large: str = Field(min_length=1)
    tenants: list[str] = Field(default_factory=list)


class ICCacheSpec(_Strict):
    routes: list[ICRouteSpec] = Field(min_length=1)
    embed: EmbedSpec = EmbedSpec()
    capacity: str = "20MiB"
    shared_tenants: list[str] = Field(default_factory=list)
    bandit: Literal["linucb", "thompson"] = "linucb"
    candidates: int | None = None
    max_examples: int | None = None
    min_similarity: float | None = None
    token_cost: float | None = None
    alpha: float | None = None
    arm_costs: tuple[float, float, float] | None = None
    arm_priors: tuple[float, float, float] | None = None
    load_threshold: float | None = None
    load_penalty: float | None = None
    load_ema: float | None = None
    feedback_ttl_s: int | None = Field(None, ge=1)
    outcome_capacity: int | None = None
    outcome_neighbours: int | None = None
    outcome_pseudo_count: float | None = None
    outcome_explore: float | None = None
    bandit_ridge: float | None = None
    replay_interval_s: float | None = None
    replay_below_load: float | None = None
    replay_budget: int | None = None
    replay_max_tokens: int | None = None

    @field_validator("capacity")
    @classmethod
    def _size(cls, v: str) -> str:
        parse_size(v)  # its ValueError names the value and shows examples
        return v

    @model_validator(mode="after")
    def _rules(self) -> ICCacheSpec:
        self.config()  # ICCacheConfig's rules: a ValueError naming the field
        return self

    def check_models(self, names: list[str]) -> None:
        """Every route's small and large model is one the app serves."""
        for i, r in enumerate(self.routes):
            for side in ("small", "large"):
                if getattr(r, side) not in names:
                    raise ValueError(
                        f"iccache.routes.{i}.{side}: {getattr(r, side)!r} is not a model of "
                        f"this config ({', '.join(names)})"
                    )
            if r.name in names:
                raise ValueError(f"iccache.routes.{i}.name: {r.name!r} is already a model name")

    def config(self, embed_dim: int = 384, embed_address: str | None = None) -> ICCacheConfig:
        """The router's ICCacheConfig (embed_address None: the registry's embed replicas)."""
        knobs = self.model_dump(
            exclude={"routes", "embed", "capacity", "shared_tenants"}, exclude_none=True
        )
        return ICCacheConfig(
            routes=tuple(
                ICRoute(name=r.name, small=r.small, large=r.large, tenants=tuple(r.tenants))
                for r in self.routes
            ),
            embed_model=self.embed.served_name,
            embed_address=embed_address,
            embed_dim=embed_dim,
            shared_tenants=tuple(self.shared_tenants),
            capacity_bytes=parse_size(self.capacity),
            **knobs,
        )
