"""Priority churn: how a request's engine priority changes over time (FastSwitch's evaluation).

FastSwitch, lacking public traces of priority changes, simulates them with two patterns taken
from Yin et al. 2024, precomputed offline, at a "priority-update frequency" of 0.04 per step
(LLaMA-8B; 0.02 for Qwen-32B). Read here as: at every step, with probability `freq`, an update
happens, and at an update

- `random`: every stream draws a new priority, uniform over [0, levels);
- `markov`: every stream moves one level up or down (each with probability 1/2; from an end
  level it moves inward), so priorities drift rather than jump.

A stream is what keeps one priority between updates: a conversation of a multi-turn workload,
else one request. Streams start at a uniform level. Lower is more urgent (the router's and the
engines' convention).

`at(stream, t)` is the stream's priority at time t (seconds): a load generator cannot see the
engine's steps, so a step here is `step_s` of wall time (a decode step's usual length); an
engine-side driver can call `at(stream, step * step_s)`. Everything is a function of the seed:
the update instants come from one stream of random numbers, each stream's draws from its own,
so a stream's priorities do not depend on which other streams were asked about, or in what
order.

Specs: `random:FREQ`, `markov:FREQ`, with optional `:LEVELS` (default 4) and `:STEP_MS`
(default 25), e.g. `markov:0.04:8:25`; `fixed:P` sends P for every request.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PATTERNS = ("random", "markov", "fixed")


@dataclass(frozen=True)
class PriorityChurn:
    pattern: str  # random | markov | fixed
    freq: float = 0.04  # updates per step (probability)
    levels: int = 4
    step_s: float = 0.025
    fixed: int = 0  # the priority of pattern fixed
    seed: int = 0

    def __post_init__(self) -> None:
        if self.pattern not in PATTERNS:
            raise ValueError(f"unknown priority pattern {self.pattern!r}: {', '.join(PATTERNS)}")
        if not 0 <= self.freq <= 1:
            raise ValueError(f"priority update frequency must be within [0, 1], got {self.freq}")
        if not 1 <= self.levels <= 256:
            raise ValueError(f"priority levels must be within [1, 256], got {self.levels}")
        if not self.step_s > 0:
            raise ValueError(f"priority step must be > 0 s, got {self.step_s}")
        if not 0 <= self.fixed <= 255:
            raise ValueError(f"a fixed priority must be within [0, 255], got {self.fixed}")

    @classmethod
    def parse(cls, spec: str, seed: int = 0) -> PriorityChurn:
        """`random:FREQ[:LEVELS[:STEP_MS]]`, `markov:FREQ[:LEVELS[:STEP_MS]]` or `fixed:P`."""
        kind, *args = spec.split(":")
        usage = (
            f"bad priorities {spec!r}: random:FREQ[:LEVELS[:STEP_MS]], "
            "markov:FREQ[:LEVELS[:STEP_MS]] or fixed:P"
        )
        try:
            if kind == "fixed" and len(args) == 1:
                return cls("fixed", 0.0, fixed=int(args[0]), seed=seed)
            if kind in ("random", "markov") and 1 <= len(args) <= 3:
                freq = float(args[0])
                levels = int(args[1]) if len(args) > 1 else 4
                step_s = float(args[2]) / 1e3 if len(args) > 2 else 0.025
                return cls(kind, freq, levels, step_s, seed=seed)
        except ValueError as e:
            raise ValueError(f"{usage} ({e})") from None
        raise ValueError(usage)

    def clock(self) -> ChurnClock:
        """A fresh evaluator (it remembers what it computed; one per run)."""
        return ChurnClock(self)

    def describe(self) -> dict:
        return {
            "pattern": self.pattern,
            "freq_per_step": self.freq,
            "levels": self.levels,
            "step_s": self.step_s,
            **({"priority": self.fixed} if self.pattern == "fixed" else {}),
        }


class ChurnClock:
    """Evaluates a PriorityChurn: the update steps are drawn lazily, as far as asked."""

    _CHUNK = 4096  # steps drawn at a time

    def __init__(self, churn: PriorityChurn) -> None:
        self.c = churn
        self._rng = np.random.default_rng([churn.seed, 11])
        self._updates = np.zeros(0, dtype=np.int64)  # step indices at which an update happens
        self._steps_drawn = 0
        self._walks: dict[int, tuple[int, int]] = {}  # stream -> (updates applied, level)

    def updates_before(self, t: float) -> int:
        """How many updates happened by time t (an update happens as its step begins)."""
        step = int(np.floor(max(t, 0.0) / self.c.step_s))
        while self._steps_drawn <= step:
            hits = np.flatnonzero(self._rng.random(self._CHUNK) < self.c.freq)
            self._updates = np.concatenate((self._updates, hits + self._steps_drawn))
            self._steps_drawn += self._CHUNK
        return int(np.searchsorted(self._updates, step, side="right"))

    def _draw(self, stream: int, k: int) -> int:
        return int(np.random.default_rng([self.c.seed, 12, stream, k]).integers(self.c.levels))

    def at(self, stream: int, t: float) -> int:
        c = self.c
        if c.pattern == "fixed":
            return c.fixed
        k = self.updates_before(t)
        if c.pattern == "random" or c.levels == 1:
            return self._draw(stream, k) if c.levels > 1 else 0
        done, level = self._walks.get(stream, (0, self._draw(stream, 0)))
        if done > k:  # asked about an earlier time: walk again from the start
            done, level = 0, self._draw(stream, 0)
        if k > done:
            moves = np.random.default_rng([c.seed, 13, stream]).random(k)[done:]
            for up in moves < 0.5:
                if level == 0:
                    level = 1
                elif level == c.levels - 1:
                    level -= 1
                else:
                    level += -1 if up else 1
        self._walks[stream] = (k, level)
        return level
