"""What happened to one request, as a client saw it, and the client interface.

Times are `time.perf_counter()` seconds. A client fills an `Outcome` as the response arrives
and calls `done` exactly once, whatever happens (success, HTTP/gRPC error, timeout, a broken
connection); it never raises into the schedule.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from loadgen.workload import Planned

NAN = math.nan


@dataclass(slots=True)
class Outcome:
    index: int
    tenant: str
    warmup: bool
    scheduled: float  # when the schedule wanted it sent
    planned_prompt_tokens: int
    planned_output_tokens: int
    sent: float = NAN  # when its bytes went to the socket
    first_token: float = NAN  # arrival of the first piece that carried generated text or ids
    end: float = NAN  # arrival of the last byte
    # Arrival time of every piece that carried tokens, first included: their gaps are the
    # inter-token latencies as a client sees them (a piece may carry several tokens).
    chunk_times: list[float] = field(default_factory=list)
    prompt_tokens: int = 0  # the server's usage when it reports it, else the planned count
    output_tokens: int = 0  # the server's usage, else tokens counted by the client, else pieces
    error: str | None = None
    priority: int | None = None  # the engine priority the request asked for, if any

    @property
    def ok(self) -> bool:
        return self.error is None and not math.isnan(self.end)

    def piece(self, now: float, tokens: int = 0) -> None:
        """A piece carrying generated tokens arrived at `now` (tokens: how many, where the
        client counts them itself rather than from the server's usage)."""
        self.chunk_times.append(now)
        self.output_tokens += tokens
        if math.isnan(self.first_token):
            self.first_token = now

    @property
    def send_lag(self) -> float:
        return self.sent - self.scheduled

    @property
    def ttft(self) -> float:
        return self.first_token - self.sent

    @property
    def e2e(self) -> float:
        return self.end - self.sent

    @property
    def tpot(self) -> float:
        """DistServe's time per output token: (e2e - TTFT) / (output tokens - 1); NaN for a
        single-token answer, which has no decode phase."""
        if self.output_tokens < 2:
            return NAN
        return (self.end - self.first_token) / (self.output_tokens - 1)

    @classmethod
    def of(cls, p: Planned, scheduled: float) -> Outcome:
        return cls(
            p.index,
            p.tenant,
            p.warmup,
            scheduled,
            p.prompt.num_tokens,
            p.max_tokens,
            prompt_tokens=p.prompt.num_tokens,
            priority=p.priority,
        )


Done = Callable[[Outcome], None]


class Client(Protocol):
    """Sends planned requests. `submit` returns at once (open loop): it writes the request now
    when it can (an idle connection) and otherwise in the background; `done(out)` is called
    once when the request ends for any reason."""

    async def open(self, connections: int) -> None: ...

    def submit(self, p: Planned, out: Outcome, done: Done) -> None: ...

    async def close(self) -> None: ...
