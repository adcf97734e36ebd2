"""Traces: what a workload asks for, before it is scaled, capped and sent.

A `Trace` is a list of `TraceRequest`s in arrival order: when (seconds from the trace's start),
how many prompt and output tokens, and, for traces that carry it, the prompt's prefix-block
identity (Mooncake's `hash_ids`) and labels such as BurstGPT's model and log type.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field


class TraceError(ValueError):
    """A trace file that cannot be read; the message names the file and the line."""

    def __init__(self, path: object, line: int | None, msg: str) -> None:
        where = f"{path}:{line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {msg}")
        self.path, self.line = path, line


@dataclass(frozen=True, slots=True)
class TraceRequest:
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    # Prefix-block ids of the prompt, one per `Trace.block_tokens` tokens (the last block may be
    # partial): equal ids at the start of two prompts mean equal token prefixes.
    hash_ids: tuple[int, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()  # e.g. (("model", "GPT-4"), ("log_type", "API log"))

    def label(self, key: str) -> str | None:
        for k, v in self.labels:
            if k == key:
                return v
        return None


@dataclass(frozen=True)
class Trace:
    name: str
    requests: Sequence[TraceRequest]
    block_tokens: int = 0  # size of a hash_ids block; 0 when the trace has no prefix identity
    source: str = ""
    notes: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if any(b.arrival_s < a.arrival_s for a, b in itertools.pairwise(self.requests)):
            raise ValueError(f"trace {self.name}: arrivals must be sorted")

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def duration_s(self) -> float:
        return self.requests[-1].arrival_s - self.requests[0].arrival_s if self.requests else 0.0

    @property
    def mean_rate(self) -> float:
        """Requests per second over the trace's span ((n - 1) gaps over its duration)."""
        d = self.duration_s
        return (len(self.requests) - 1) / d if d > 0 else float("inf")

    def head(self, n: int) -> Trace:
        return Trace(self.name, self.requests[:n], self.block_tokens, self.source, self.notes)
