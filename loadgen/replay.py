"""Open-loop replay: every planned request is sent at its time, whether or not earlier ones have
answered (a closed loop would slow down with the server and hide its queueing).

The schedule sleeps until `spin_s` (1.5 ms) before a send time and then yields to the event
loop (which keeps reading responses) until the time comes: asyncio's timers are only good to
about a millisecond. `spin_s=0` sleeps all the way: less CPU, up to a millisecond more lag.
Each request's send lag (sent - scheduled) is recorded, so a run that could not keep its
schedule says so instead of silently measuring a lighter load.

A later turn of a conversation (`Planned.follows`) is scheduled when its previous turn ends,
`think_s` later; if that turn failed, the conversation stops there and its remaining turns
fail with "previous turn failed" (they are not sent). With a priority churn, each request's
priority is its stream's at its scheduled time.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import resource
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from loadgen.churn import PriorityChurn
from loadgen.outcome import Client, Outcome
from loadgen.workload import Planned

perf = time.perf_counter
SPIN_S = 0.0015
LEAD_S = 0.05  # from the call to the first send time: lets the caller's set-up settle


@dataclass
class RunResult:
    outcomes: list[Outcome]
    t0: float  # perf_counter() of schedule time 0
    started_at: float  # wall clock (time.time()) of schedule time 0
    wall_s: float  # schedule time 0 to the last request's end
    connections_opened: int = 0


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    """asyncio.run on uvloop where it is installed (its loop is about twice as fast)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def raise_fd_limit() -> None:
    """An open loop against a slow server holds one connection per request in flight."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Progress:
    """Counts one run as it goes (a fresh one per run); `replay` updates it, a display reads it."""

    def __init__(self, total: int) -> None:
        self.total, self.sent, self.done, self.errors = total, 0, 0, 0


async def replay(
    planned: Sequence[Planned],
    client: Client,
    connections: int = 8,
    progress: Progress | None = None,
    drain_timeout_s: float = 600.0,
    spin_s: float = SPIN_S,
    priorities: PriorityChurn | None = None,
) -> RunResult:
    """Sends `planned` on schedule through `client` and waits for every answer (each bounded
    by the client's own timeout, the whole drain by `drain_timeout_s`)."""
    raise_fd_limit()
    await client.open(connections)
    loop = asyncio.get_running_loop()
    finished = loop.create_future()
    prog = progress or Progress(len(planned))
    outcomes: list[Outcome] = []
    clock = priorities.clock() if priorities is not None else None
    followers: dict[int, Planned] = {p.follows: p for p in planned if p.follows is not None}
    timers: set[asyncio.TimerHandle] = set()

    def send(p: Planned, target: float) -> None:
        if clock is not None:
            p = dataclasses.replace(p, priority=clock.at(p.stream, target - t0))
        out = Outcome.of(p, target)
        outcomes.append(out)
        prog.sent += 1
        client.submit(p, out, done)

    def send_at(p: Planned, target: float) -> None:
        def fire() -> None:
            timers.discard(handle)
            send(p, target)

        handle = loop.call_at(_loop_time(loop, target), fire)
        timers.add(handle)

    def done(out: Outcome) -> None:
        prog.done += 1
        if out.error is not None:
            prog.errors += 1
        nxt = followers.pop(out.index, None)
        if nxt is not None:
            if out.ok:
                send_at(nxt, perf() + nxt.think_s)
            else:  # the conversation stops: its next turn fails unsent (and so on down)
                lost = Outcome.of(nxt, perf())
                lost.error = "previous turn failed"
                outcomes.append(lost)
                done(lost)
        if prog.done == len(planned) and not finished.done():
            finished.set_result(None)

    t0 = perf() + LEAD_S
    started_at = time.time() + LEAD_S
    try:
        for p in planned:
            if p.follows is not None:
                continue
            target = t0 + p.at_s
            while True:
                wait = target - perf()
                if wait <= 0:
                    break
                await asyncio.sleep(wait - spin_s if wait > 2 * spin_s else 0)
            send(p, target)
        if planned:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(finished), drain_timeout_s)
    finally:
        for h in timers:
            h.cancel()
        for out in outcomes:
            if out.error is None and out.end != out.end:
                out.error = "unfinished when the run ended"
        sent = {o.index for o in outcomes}
        for p in planned:  # later turns whose conversation had not got there
            if p.index not in sent:
                lost = Outcome.of(p, math.nan)
                lost.error = "not sent when the run ended"
                outcomes.append(lost)
        await client.close()
    ends = [o.end for o in outcomes if o.end == o.end]
    wall = (max(ends) if ends else perf()) - t0
    opened = getattr(client, "connections_opened", 0)
    return RunResult(outcomes, t0, started_at, wall, opened)


def _loop_time(loop: asyncio.AbstractEventLoop, at_perf: float) -> float:
    """The event loop's clock at the perf_counter instant `at_perf`."""
    return loop.time() + (at_perf - perf())
