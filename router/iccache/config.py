"""IC-Cache's typed configuration: the routes that turn it on, and its knobs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

ARMS = ("small+examples", "small", "large")


@dataclass(frozen=True, kw_only=True)
class ICRoute:
    """A model name clients ask for (e.g. "auto") that IC-Cache answers with `small` (with or
    without examples) or `large`. tenants: who may use it (empty: every tenant)."""

    name: str
    small: str
    large: str
    tenants: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "tenants", tuple(self.tenants))
        if not self.name or self.name in (self.small, self.large):
            raise ValueError(f"route name {self.name!r} must be set and differ from its models")
        if self.small == self.large:
            raise ValueError(f"route {self.name!r}: small and large must differ")

    def allows(self, tenant: str) -> bool:
        return not self.tenants or tenant in self.tenants


@dataclass(frozen=True, kw_only=True)
class ICCacheConfig:
    """shared_tenants: tenants who opted in to sharing (their examples go to, and are drawn
    from, the shared pool besides their own); every other tenant's stay its own.
    arm_costs: the cost term subtracted from judged quality in each arm's reward.
    arm_priors: each arm's expected quality where no similar request has been judged yet.
    outcome_*: the judged-outcome memory behind each arm's estimate for a request: how many
    outcomes a scope keeps, how many nearest are consulted, the prior's weight in neighbours,
    and the exploration bonus (explore / sqrt(evidence + pseudo_count)).
    bandit_ridge: how many judged requests' worth of weight the bandit's prior (each arm's
    estimate minus its cost) carries against its learned correction.
    load_threshold: in-flight requests (moving average) at the large model past which the
    tanh-shaped penalty, up to load_penalty, biases against it."""

    routes: tuple[ICRoute, ...]
    embed_model: str = "all-minilm-l6-v2"
    embed_address: str | None = None  # fixed address; None: the service registry's replicas
    embed_dim: int = 384  # the embedding model's width (all-MiniLM-L6-v2: 384)
    shared_tenants: tuple[str, ...] = ()
    capacity_bytes: int = 20 << 20  # per scope
    candidates: int = 16
    max_examples: int = 4
    min_similarity: float = 0.3
    token_cost: float = 0.001  # utility an example's prompt token must pay for
    bandit: Literal["linucb", "thompson"] = "linucb"
    alpha: float = 0.2
    arm_costs: tuple[float, float, float] = (0.05, 0.0, 0.2)
    arm_priors: tuple[float, float, float] = (0.55, 0.3, 0.7)
    outcome_capacity: int = 20_000
    outcome_neighbours: int = 16
    outcome_pseudo_count: float = 2.0
    outcome_explore: float = 0.5
    bandit_ridge: float = 4.0
    load_threshold: float = 4.0
    load_penalty: float = 0.6
    load_ema: float = 0.2
    feedback_ttl_s: int = 3600
    replay_interval_s: float = 0.0  # 0: no background replay
    replay_below_load: float = 1.0  # replay only while every large model's load is below
    replay_budget: int = 4  # examples re-asked per scope and pass
    replay_max_tokens: int = 512
    seed: int = 0
    routes_by_name: dict[str, ICRoute] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "routes", tuple(self.routes))
        object.__setattr__(self, "shared_tenants", tuple(self.shared_tenants))
        names = [r.name for r in self.routes]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate IC-Cache route names {names}")
        for name in ("capacity_bytes", "candidates", "max_examples", "embed_dim",
                     "outcome_capacity", "outcome_neighbours", "outcome_pseudo_count",
                     "bandit_ridge", "replay_below_load", "replay_budget",
                     "replay_max_tokens"):  # fmt: skip
            v = getattr(self, name)
            if v <= 0:
                raise ValueError(f"{name} must be positive, got {v}")
        if not -1.0 <= self.min_similarity <= 1.0:
            raise ValueError(f"min_similarity must be within [-1, 1], got {self.min_similarity}")
        if self.bandit not in ("linucb", "thompson"):
            raise ValueError(f"bandit must be linucb or thompson, got {self.bandit!r}")
        if len(self.arm_costs) != 3 or len(self.arm_priors) != 3:
            raise ValueError(f"arm_costs and arm_priors need one value per arm {ARMS}")
        if self.replay_interval_s < 0:
            raise ValueError(f"replay_interval_s must be >= 0, got {self.replay_interval_s}")
        if self.outcome_explore < 0:
            raise ValueError(f"outcome_explore must be >= 0, got {self.outcome_explore}")
        if self.load_threshold <= 0 or not 0 < self.load_ema <= 1:
            raise ValueError("load_threshold must be > 0 and load_ema within (0, 1]")
        object.__setattr__(self, "routes_by_name", {r.name: r for r in self.routes})
