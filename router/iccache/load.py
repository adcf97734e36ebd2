"""Each model's load as this router sees it: requests in flight, as an exponential moving
average updated at every start and end, and the tanh-shaped penalty IC-Cache's router puts on
the expensive model once that average passes a threshold."""

from __future__ import annotations

import math
from collections import defaultdict


class LoadWatch:
    def __init__(self, beta: float) -> None:
        self.beta = beta
        self.inflight: dict[str, int] = defaultdict(int)
        self.ema: dict[str, float] = defaultdict(float)

    def _tick(self, model: str) -> None:
        self.ema[model] += self.beta * (self.inflight[model] - self.ema[model])

    def start(self, model: str) -> None:
        self.inflight[model] += 1
        self._tick(model)

    def end(self, model: str) -> None:
        self.inflight[model] = max(0, self.inflight[model] - 1)
        self._tick(model)


def load_penalty(ema: float, threshold: float, scale: float) -> float:
    """0 up to the threshold, then rising smoothly towards `scale`."""
    return scale * math.tanh(max(0.0, ema - threshold) / threshold)
