"""The scheduler's policy seam: which waiting request is admitted next, where a preempted
request goes back, and which running request gives way when KV blocks run out.

A policy only orders. The scheduler keeps the budget (tokens, sequence slots, blocks) and the
mechanics (allocation, preemption by recompute, request state).
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Protocol

from services.engine.request import Request

POLICIES = ("fcfs", "priority")


class SchedulingPolicy(Protocol):
    """The waiting queue of one scheduler, and its choice of preemption victims.

    The policy holds the waiting requests; the scheduler holds the running ones. No method
    changes a request: status, blocks and token counts are the scheduler's.

    - add(req): a new request joins the queue.
    - requeue(req): a request preempted from the running batch comes back (its blocks are
      released, its num_computed_tokens is 0; it keeps its output tokens).
    - peek(): the request to admit next, or None if none waits. The scheduler either admits it
      (and calls pop) or admits nothing more in this step: nobody overtakes the head.
    - pop(): remove and return the request peek() named.
    - remove(req): a waiting request was aborted or finished; it leaves the queue.
    - victim(running): the running request to preempt. `running` is in admission order and never
      empty; any of them may be named, also one already scheduled in this step (it gives its
      slice back) or the one asking for blocks. The scheduler asks again, without the victim,
      until the blocks suffice or the one asking is named.
    - preempt_for(req, running): a running request that should give way so that the waiting
      `req` (the head, whose blocks lack) can be admitted, or None: nobody is preempted for it.
    - len() and iteration: the waiting requests, in no promised order.
    """

    def add(self, req: Request) -> None: ...

    def requeue(self, req: Request) -> None: ...

    def peek(self) -> Request | None: ...

    def pop(self) -> Request: ...

    def remove(self, req: Request) -> None: ...

    def victim(self, running: Sequence[Request]) -> Request: ...

    def preempt_for(self, req: Request, running: Sequence[Request]) -> Request | None: ...

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Request]: ...


class FCFSPolicy:
    """First come, first served. A preempted request goes to the front of the queue (it came
    before everything still waiting), and the newest running request is preempted first."""

    def __init__(self) -> None:
        self._queue: deque[Request] = deque()

    def add(self, req: Request) -> None:
        self._queue.append(req)

    def requeue(self, req: Request) -> None:
        self._queue.appendleft(req)

    def peek(self) -> Request | None:
        return self._queue[0] if self._queue else None

    def pop(self) -> Request:
        return self._queue.popleft()

    def remove(self, req: Request) -> None:
        self._queue.remove(req)

    def victim(self, running: Sequence[Request]) -> Request:
        return running[-1]

    def preempt_for(self, req: Request, running: Sequence[Request]) -> Request | None:
        return None  # the head waits for blocks to come free

    def __len__(self) -> int:
        return len(self._queue)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._queue)


class PriorityPolicy:
    """Request.priority orders the queue, lower values first, ties first come first served; a
    preempted request goes back to its place in that order. The victim is the running request
    with the highest priority value, the newest admitted among equals; a waiting request whose
    blocks lack preempts running ones of a worse priority (a priority change is a context
    switch, as FastSwitch has it)."""

    def __init__(self) -> None:
        # (priority, arrival time, push number, request): a preempted request is pushed again
        # under its own arrival time; the push number orders equal times and keeps heapq from
        # ever comparing two requests.
        self._heap: list[tuple[int, float, int, Request]] = []
        self._pushes = itertools.count()

    def add(self, req: Request) -> None:
        heapq.heappush(self._heap, (req.priority, req.arrival_time, next(self._pushes), req))

    def requeue(self, req: Request) -> None:
        self.add(req)

    def peek(self) -> Request | None:
        return self._heap[0][-1] if self._heap else None

    def pop(self) -> Request:
        return heapq.heappop(self._heap)[-1]

    def remove(self, req: Request) -> None:
        self._heap = [e for e in self._heap if e[-1] is not req]
        heapq.heapify(self._heap)

    def victim(self, running: Sequence[Request]) -> Request:
        return max(enumerate(running), key=lambda ir: (ir[1].priority, ir[0]))[1]

    def preempt_for(self, req: Request, running: Sequence[Request]) -> Request | None:
        """A waiting request preempts running ones of a strictly worse priority (the worst,
        newest first); never one of its own priority or better, so nothing thrashes."""
        if not running:
            return None
        v = self.victim(running)
        return v if v.priority > req.priority else None

    def reorder(self, req: Request) -> None:
        """req's priority changed while it waits: its place in the queue follows."""
        self.remove(req)
        self.add(req)

    def __len__(self) -> int:
        return len(self._heap)

    def __iter__(self) -> Iterator[Request]:
        return (e[-1] for e in self._heap)


def make_policy(name: str) -> SchedulingPolicy:
    if name == "fcfs":
        return FCFSPolicy()
    if name == "priority":
        return PriorityPolicy()
    raise ValueError(f"unknown scheduling policy {name!r}; choose one of: {', '.join(POLICIES)}")
