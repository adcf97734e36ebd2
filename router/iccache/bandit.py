"""The request router: a contextual bandit over {small + examples, small, large}.

Each arm has a linear model of its reward (judged quality minus the arm's cost) in the
context x: LinUCB scores an arm by its estimate plus alpha times its uncertainty; Thompson
sampling scores it by a draw from the posterior. The caller subtracts the load penalty of the
large arm before the pick, so offloading rises as the large model's load passes its
threshold. Rewards arrive sparsely (feedback), so arms start from a prior on the intercept.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CONTEXT_DIM = 5


def context(max_sim: float, mean_utility: float, n_examples: int, max_examples: int,
            prompt_chars: int) -> np.ndarray:  # fmt: skip
    """[1, best similarity, mean predicted utility of the chosen examples, share of the
    example budget used, log prompt length]."""
    return np.array(
        [1.0, max_sim, mean_utility, n_examples / max_examples, np.log1p(prompt_chars) / 10],
        dtype=np.float64,
    )


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
        priors: tuple[float, ...],
        kind: str = "linucb",
        alpha: float = 0.5,
        ridge: float = 1.0,
        seed: int = 0,
        dim: int = CONTEXT_DIM,
    ) -> None:
        if kind not in ("linucb", "thompson"):
            raise ValueError(f"bandit kind must be linucb or thompson, got {kind!r}")
        self.names = arms
        self.kind, self.alpha = kind, alpha
        self.rng = np.random.default_rng(seed)
        self.arms: dict[str, _Arm] = {}
        for name, prior in zip(arms, priors, strict=True):
            b = np.zeros(dim)
            b[0] = ridge * prior  # the intercept starts at the prior
            self.arms[name] = _Arm(ridge * np.eye(dim), b)

    def scores(self, x: np.ndarray, penalty: dict[str, float] | None = None) -> dict[str, float]:
        penalty = penalty or {}
        out = {}
        for name, arm in self.arms.items():
            inv = np.linalg.inv(arm.a)
            theta = inv @ arm.b
            if self.kind == "linucb":
                s = float(theta @ x + self.alpha * np.sqrt(x @ inv @ x))
            else:
                s = float(self.rng.multivariate_normal(theta, self.alpha**2 * inv) @ x)
            out[name] = s - penalty.get(name, 0.0)
        return out

    def choose(
        self, x: np.ndarray, allowed: tuple[str, ...], penalty: dict[str, float] | None = None
    ) -> tuple[str, dict[str, float]]:
        s = self.scores(x, penalty)
        best = max(allowed, key=lambda a: s[a])
        return best, s

    def update(self, arm: str, x: np.ndarray, reward: float) -> None:
        a = self.arms[arm]
        a.a += np.outer(x, x)
        a.b += reward * x
        a.n += 1

    def estimate(self, arm: str, x: np.ndarray) -> float:
        return float(self.arms[arm].theta @ x)
