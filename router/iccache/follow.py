"""Following a Redis log into an in-process mirror when many requests ask at once.

One reader at a time: concurrent readers would each read the log from the same point and
apply every new entry once per reader. And a caller that had to wait for the lock skips its
own read when a read that began after it arrived has ended meanwhile: that read saw everything
the caller would have. A burst of decisions then costs one round trip, not one per decision,
and each still sees every entry written before it asked.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable


class Follower:
    """Make it inside the event loop that uses it."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.started = 0  # reads begun
        self.done = 0  # the number of the latest read that has ended

    async def follow(self, read: Callable[[], Awaitable[None]]) -> None:
        arrived = self.started
        async with self.lock:
            if self.done > arrived:
                return
            self.started += 1
            ticket = self.started
            await read()
            self.done = ticket
