"""The request router: a contextual bandit over {small + examples, small, large}.

Each arm has a linear model of its reward (judged quality minus the arm's cost) in the
context x: LinUCB scores an arm by its estimate plus alpha times its uncertainty; Thompson
sampling scores it by a draw from the posterior. The caller adds an offset per arm before
the pick: IC-Cache's is an exploration bonus where an arm has little nearby evidence, minus the
large arm's load penalty (so offloading rises as the large model's load passes its
threshold). Rewards arrive sparsely (feedback), so arms start from a prior: either on the intercept
(a number) or a whole weight vector (IC-Cache's: the arm's own outcome estimate minus its
cost, so before any feedback an arm is scored by what its neighbours' judged outcomes say).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BASE_DIM = 5  # the features before the per-arm outcome estimates


def context(max_sim: float, mean_utility: float, n_examples: int, max_examples: int,
            prompt_chars: int, estimates: tuple[float, ...] = ()) -> np.ndarray:  # fmt: skip
    """[1, best similarity, mean predicted utility of the chosen examples, share of the
    example budget used, log prompt length, then each arm's outcome estimate (the judged
    scores of similar past requests)]."""
    base = [1.0, max_sim, mean_utility, n_examples / max_examples, np.log1p(prompt_chars) / 10]
    return np.array(base + list(estimates), dtype=np.float64)


def own_estimate_prior(costs: tuple[float, ...]) -> tuple[np.ndarray, ...]:
    """Each arm's prior weights: its reward is its own outcome estimate minus its cost."""
    eye = np.eye(BASE_DIM + len(costs))
    return tuple(eye[BASE_DIM + i] - c * eye[0] for i, c in enumerate(costs))


@dataclass
class _Arm:
    a: np.ndarray  # [d, d]: ridge Gram matrix
    b: np.ndarray  # [d]
    n: int = 0

    @property
    def theta(self) -> np.ndarray:
        return np.linalg.solve(self.a, self.b)


class ContextualBandit:
    def __init__(
        self,
        arms: tuple[str, ...],
        priors: tuple[float | np.ndarray, ...],
        kind: str = "linucb",
        alpha: float = 0.5,
        ridge: float = 1.0,
        seed: int = 0,
        dim: int = BASE_DIM + 3,
    ) -> None:
        if kind not in ("linucb", "thompson"):
            raise ValueError(f"bandit kind must be linucb or thompson, got {kind!r}")
        self.names = arms
        self.kind, self.alpha = kind, alpha
        self.rng = np.random.default_rng(seed)
        self.arms: dict[str, _Arm] = {}
        for name, prior in zip(arms, priors, strict=True):
            theta0 = np.zeros(dim)
            if np.ndim(prior) == 0:
                theta0[0] = float(prior)  # the intercept starts at the prior
            else:
                theta0[:] = prior
            self.arms[name] = _Arm(ridge * np.eye(dim), ridge * theta0)

    def scores(self, x: np.ndarray, offset: dict[str, float] | None = None) -> dict[str, float]:
        offset = offset or {}
        out = {}
        for name, arm in self.arms.items():
            inv = np.linalg.inv(arm.a)
            theta = inv @ arm.b
            if self.kind == "linucb":
                s = float(theta @ x + self.alpha * np.sqrt(x @ inv @ x))
            else:
                s = float(self.rng.multivariate_normal(theta, self.alpha**2 * inv) @ x)
            out[name] = s + offset.get(name, 0.0)
        return out

    def choose(
        self, x: np.ndarray, allowed: tuple[str, ...], offset: dict[str, float] | None = None
    ) -> tuple[str, dict[str, float]]:
        s = self.scores(x, offset)
        best = max(allowed, key=lambda a: s[a])
        return best, s

    def update(self, arm: str, x: np.ndarray, reward: float) -> None:
        a = self.arms[arm]
        a.a += np.outer(x, x)
        a.b += reward * x
        a.n += 1

    def estimate(self, arm: str, x: np.ndarray) -> float:
        return float(self.arms[arm].theta @ x)
