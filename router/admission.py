"""Admission gates: at most max_running requests run, up to max_queued more wait in arrival
order (each at most max_queue_s), and any further one is refused at once, which the APIs turn
into HTTP 429 with Retry-After and gRPC RESOURCE_EXHAUSTED.

Each tenant has a gate of its own (router.tenants.Tenant); the router replica has one more over
all its requests, HTTP and gRPC together (`AdmissionLimits` in its RouterConfig), so that an
overload of any mix of tenants, or of unauthenticated traffic with auth off, is shed at the door
while the requests it admits keep their latency: queues stay bounded, memory with them.

    gate = Gate(AdmissionLimits(max_running=64, max_queued=64, max_queue_s=5))
    await gate.acquire()   # raises GateBusyError when full, or after max_queue_s in the queue
    try: ... finally: gate.release()

A gate may be shared by code on several event loops (the HTTP app and the gRPC service run on
one loop under Ray Serve, on two in some tests): its state changes under a lock, and a waiter
is woken on its own loop.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections import deque
from dataclasses import dataclass


class GateBusyError(Exception):
    """The gate has max_running requests running and max_queued waiting, or a request waited
    max_queue_s without a slot."""


@dataclass(frozen=True)
class AdmissionLimits:
    """A router replica's bounds over all its requests (HTTP and gRPC). max_queue_s: how long a
    request may wait for a slot before it is refused (inf: as long as it takes)."""

    max_running: int = 1024
    max_queued: int = 1024
    max_queue_s: float = 30.0

    def __post_init__(self) -> None:
        if self.max_running < 1:
            raise ValueError(f"max_running must be >= 1, got {self.max_running}")
        if self.max_queued < 0:
            raise ValueError(f"max_queued must be >= 0, got {self.max_queued}")
        if not self.max_queue_s > 0:  # NaN too
            raise ValueError(f"max_queue_s must be positive, got {self.max_queue_s}")


@dataclass(eq=False)
class _Waiter:
    loop: asyncio.AbstractEventLoop
    fut: asyncio.Future
    granted: bool = False  # set under the lock when release() hands this waiter its slot
    expired: bool = False  # set under the lock when max_queue_s passed first


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


class Gate:
    """acquire() and release() pair up: every acquire that returns is matched by one release.
    `running`, `queued` and `rejected` are plain ints for metrics (read without the lock)."""

    error: type[GateBusyError] = GateBusyError  # what a refusal raises

    def __init__(
        self, max_running: int, max_queued: int, max_queue_s: float = math.inf, what: str = ""
    ) -> None:
        self.max_running = max_running
        self.max_queued = max_queued
        self.max_queue_s = max_queue_s
        self.what = what or "the router"  # who is full, for the refusal's message
        self.running = 0
        self.rejected = 0  # requests refused, full or after waiting max_queue_s
        self._waiters: deque[_Waiter] = deque()
        self._lock = threading.Lock()

    @classmethod
    def of(cls, limits: AdmissionLimits) -> Gate:
        return cls(limits.max_running, limits.max_queued, limits.max_queue_s)

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def _busy(self, waited: bool) -> GateBusyError:
        self.rejected += 1
        if waited:
            return self.error(
                f"{self.what} had no free slot within {self.max_queue_s:g} s "
                f"({self.running} requests running, its limit); retry later"
            )
        return self.error(
            f"{self.what} has {self.running} requests running and {len(self._waiters)} "
            "queued, its limit; retry later"
        )

    async def acquire(self) -> None:
        loop = asyncio.get_running_loop()
        with self._lock:
            if self.running < self.max_running and not self._waiters:
                self.running += 1
                return
            if len(self._waiters) >= self.max_queued:
                raise self._busy(waited=False)
            w = _Waiter(loop, loop.create_future())
            self._waiters.append(w)
        # Not asyncio.wait_for: on Python 3.11 it swallows a cancellation that arrives with
        # the slot, and the request of a client that left would run.
        timer = None if math.isinf(self.max_queue_s) else loop.call_later(
            self.max_queue_s, self._expire, w
        )  # fmt: skip
        try:
            await w.fut  # release() hands its slot over: `running` stays as it is
        except asyncio.CancelledError:
            with self._lock:
                passed = w.granted
                if not passed and not w.expired:
                    self._waiters.remove(w)
            if passed:
                self.release()  # the slot arrived as we were cancelled: pass it on
            raise
        finally:
            if timer is not None:
                timer.cancel()

    def _expire(self, w: _Waiter) -> None:
        """max_queue_s passed without a slot: out of the queue, refused (on w's loop)."""
        with self._lock:
            if w.granted:
                return  # the slot came just in time
            self._waiters.remove(w)
            w.expired = True
            err = self._busy(waited=True)
        if not w.fut.done():
            w.fut.set_exception(err)

    def release(self) -> None:
        with self._lock:
            if self._waiters:
                w = self._waiters.popleft()
                w.granted = True
                w.loop.call_soon_threadsafe(_wake, w.fut)
                return
            self.running -= 1
