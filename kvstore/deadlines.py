"""How long a client waits on a holder: as long as a slow or busy machine needs, and no longer than
it takes to tell that a holder is dead or hung.

A fixed deadline per call does neither: on two busy cores, 32 clients putting 1,000 blocks each
ran past a 10 s deadline although every holder was serving, while a 10 s wait is long for a
dead holder and one small block. So a call is bounded by what it carries and by progress:

- A call that moves blocks gives up on its holder after `stall_s` without progress while it was
  waiting on that holder: no message of a Get arrived, no message of a Put was taken. A holder
  that keeps moving, however slowly, is never given up on; a dead or hung one is, `stall_s` after
  its last sign of life (a dead holder's connection usually fails at once).
- A Put's last messages may sit in the connection's buffers while the holder stores them, with
  nothing to watch, so a Put also has a deadline that grows with the work it carries:
      base_s + bytes / floor_bytes_per_s + blocks * per_block_s
  The floor is hundreds of times below what the store sustains on a busy 2-core machine (about
  600 MB/s and 20,000 small blocks/s on loopback), so only a holder that stopped serving hits it.
- Calls that carry no blocks (Unpin, Stats, GetDevice) get base_s.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, fields

import grpc


@dataclass(frozen=True)
class CallBudget:
    base_s: float = 10.0
    stall_s: float = 10.0
    floor_bytes_per_s: float = 1024 * 1024
    per_block_s: float = 0.01

    def __post_init__(self) -> None:
        for f in fields(self):
            if not getattr(self, f.name) > 0:
                raise ValueError(
                    f"CallBudget.{f.name} must be positive, got {getattr(self, f.name)}"
                )

    def deadline_s(self, nbytes: int, nblocks: int) -> float:
        """The deadline of a call that carries nbytes in nblocks blocks."""
        return self.base_s + nbytes / self.floor_bytes_per_s + nblocks * self.per_block_s


class Watchdog:
    """Cancels a gRPC call once it has waited on its holder for `stall_s` without an answer.

    Its own streams mark the waits: a Get waits for each message, a Put for the holder's side to
    take each message it writes; the client's own work between them never counts. One timer per
    call, re-armed only when it fires.

        dog = Watchdog(budget.stall_s, holder_id)
        call = stub.Put(dog.requests(messages), timeout=budget.deadline_s(nbytes, nblocks))
        with dog.watching(call):
            resp = await call
    """

    def __init__(self, stall_s: float, holder_id: str) -> None:
        self.stall_s = stall_s
        self.holder_id = holder_id
        self.tripped = False
        self._call: grpc.aio.Call | None = None
        self._since: float | None = None  # when the current wait began; None: not waiting
        self._timer: asyncio.TimerHandle | None = None

    @contextlib.contextmanager
    def watching(self, call: grpc.aio.Call) -> Iterator[Watchdog]:
        """Watch a call; one the watchdog cancelled raises DEADLINE_EXCEEDED as a deadline would
        (grpc.aio reports a local cancel as asyncio.CancelledError)."""
        self._call = call
        try:
            yield self
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self.tripped and (task is None or not task.cancelling()):
                raise grpc.aio.AioRpcError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    grpc.aio.Metadata(),
                    grpc.aio.Metadata(),
                    details=f"no progress from holder {self.holder_id} for {self.stall_s:g} s",
                ) from None
            raise
        finally:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    async def responses(self) -> AsyncIterator:
        """The watched call's messages, each awaited under watch."""
        assert self._call is not None, "responses() of a call not being watched"
        it = aiter(self._call)
        while True:
            self._waiting()
            try:
                msg = await anext(it)
            except StopAsyncIteration:
                return
            finally:
                self._since = None
            yield msg

    async def requests(self, msgs: Iterable[bytes]) -> AsyncIterator[bytes]:
        """A request stream whose writes are watched: gRPC asks for the next message once the
        holder's side has taken the previous one."""
        for msg in msgs:
            self._waiting()
            yield msg
            self._since = None

    def _waiting(self) -> None:
        loop = asyncio.get_running_loop()
        self._since = loop.time()
        if self._timer is None:
            self._timer = loop.call_at(self._since + self.stall_s, self._check, loop)

    def _check(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        if self._since is None or self.tripped or self._call is None:
            return
        due = self._since + self.stall_s
        if loop.time() < due:
            self._timer = loop.call_at(due, self._check, loop)
            return
        self.tripped = True
        self._call.cancel()
