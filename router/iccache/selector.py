"""The example selector, in two stages: the ANN index's most similar examples (relevance),
then a utility model that predicts each candidate's gain for this request and picks a
combination: best first, skipping near-duplicates of what is already chosen, keeping an
example only while its predicted gain pays for its prompt tokens.

The utility model is an online ridge regression over per-(request, example) features,
trained from feedback: when a small-model answer that used examples is judged, each of them
gets that score as its target. Before any feedback it predicts the similarity itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from router.iccache.store import Hit

UTILITY_DIM = 5
DUPLICATE_SIM = 0.97  # two examples this close teach the small model nothing more than one


def features(hit: Hit) -> np.ndarray:
    ex = hit.example
    return np.array(
        [1.0, hit.similarity, ex.mean_gain, np.log1p(ex.uses) / 5, ex.tokens / 500],
        dtype=np.float64,
    )


@dataclass(frozen=True)
class Chosen:
    hit: Hit
    utility: float
    x: np.ndarray  # the features it was scored on (kept for the feedback update)


class UtilityModel:
    def __init__(self, ridge: float = 4.0) -> None:
        self.a = ridge * np.eye(UTILITY_DIM)
        prior = np.zeros(UTILITY_DIM)
        prior[1] = 1.0  # utility ~ similarity until feedback says otherwise
        self.b = self.a @ prior
        self.n = 0

    def predict(self, x: np.ndarray) -> float:
        return float(np.linalg.solve(self.a, self.b) @ x)

    def update(self, x: np.ndarray, target: float) -> None:
        self.a += np.outer(x, x)
        self.b += target * x
        self.n += 1


class Selector:
    def __init__(
        self, max_examples: int, min_similarity: float, token_cost: float, threshold: float = 0.0
    ) -> None:
        self.max_examples = max_examples
        self.min_similarity = min_similarity
        self.token_cost = token_cost
        self.threshold = threshold
        self.utility = UtilityModel()

    def select(self, hits: list[Hit]) -> list[Chosen]:
        scored = [
            Chosen(h, self.utility.predict(x), x)
            for h in hits
            if h.similarity >= self.min_similarity
            for x in (features(h),)
        ]
        scored.sort(key=lambda c: c.utility, reverse=True)
        chosen: list[Chosen] = []
        for c in scored:
            if len(chosen) == self.max_examples:
                break
            if c.utility - self.token_cost * c.hit.example.tokens <= self.threshold:
                continue  # its predicted gain does not pay for its prompt length
            emb = c.hit.example.emb
            if any(float(emb @ o.hit.example.emb) > DUPLICATE_SIM for o in chosen):
                continue
            chosen.append(c)
        return chosen

    def learn(self, chosen_x: list[np.ndarray], score: float) -> None:
        for x in chosen_x:
            self.utility.update(x, score)
