"""Streams of one HTTP request (one backend stream per choice) and their delivery: primed before
the response starts, pieces merged in arrival order, SSE chunks, and a client's disconnect
noticed before or during the response, which closes every backend stream."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from router.errors import from_exception
from router.openai_api import Plan, Shaper
from router.tenants import Tenant
from rpc.piece import Piece

if TYPE_CHECKING:
    from router.app import Backend

log = logging.getLogger(__name__)


def unwrap(e: BaseException) -> BaseException:
    """The first real error of a TaskGroup's ExceptionGroup."""
    while isinstance(e, BaseExceptionGroup):
        real = [x for x in e.exceptions if not isinstance(x, asyncio.CancelledError)]
        e = (real or list(e.exceptions))[0]
    return e


# -- backend streams ---------------------------------------------------------------------------


class StreamEndedError(RuntimeError):
    """A backend stream ended without a finish_reason."""


class Streams:
    """One backend stream per choice of a request, and the tenant slot they hold.

    close() is idempotent and must run once the streams are no longer read: it closes every
    backend iterator (cancelling whatever still runs on the replicas) and frees the slot."""

    def __init__(self, tenant: Tenant | None) -> None:
        self.its: list[AsyncIterator[Piece]] = []
        self.firsts: list[Piece] = []
        self._tenant = tenant
        self._closed = False
        self.on_close: Callable[[], None] | None = None  # runs once, when the streams close

    def open(self, backend: Backend, p: Plan) -> None:
        t = self._tenant
        name, salt = (t.name, t.cache_salt) if t is not None else ("", "")
        for k, s in enumerate(p.subs):
            rid = f"{p.request_id}-{k}"
            gen = backend.generate(
                p.model, s.prompt_ids, s.params, rid, tenant=name, priority=p.priority,
                cache_salt=salt,
            )  # fmt: skip
            self.its.append(gen)

    async def prime(self) -> None:
        """Wait for every stream's first piece, so that a refusal arrives before the response
        has started."""
        if len(self.its) == 1:
            self.firsts = [await _next(self.its[0])]
            return
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(_next(it)) for it in self.its]
        self.firsts = [t.result() for t in tasks]

    async def pieces(self) -> AsyncIterator[tuple[int, Piece]]:
        """(stream index, piece) as they come, first pieces first; each stream up to and
        including its piece with a finish_reason."""
        live = []
        for k, first in enumerate(self.firsts):
            yield k, first
            if not first.finish_reason:
                live.append(k)
        if len(live) == 1:  # the common case, without tasks
            it = self.its[live[0]]
            while True:
                piece = await _next(it)
                yield live[0], piece
                if piece.finish_reason:
                    return
        pending = {asyncio.ensure_future(_next(self.its[k])): k for k in live}
        try:
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for f in done:
                    k = pending.pop(f)
                    piece = f.result()
                    if not piece.finish_reason:
                        pending[asyncio.ensure_future(_next(self.its[k]))] = k
                    yield k, piece
        finally:
            for f in pending:
                f.cancel()
            if pending:
                await asyncio.wait(pending)

    async def collect(self, shaper: Shaper) -> None:
        """Run every stream to its end, into the shaper's choice states."""

        async def one(k: int) -> None:
            st = shaper.states[k]
            while st.finish_reason is None:
                st.add(await _next(self.its[k]))

        if len(self.its) == 1:
            await one(0)
            return
        async with asyncio.TaskGroup() as tg:
            for k in range(len(self.its)):
                tg.create_task(one(k))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            for it in self.its:
                try:
                    await it.aclose()  # type: ignore[attr-defined]
                except Exception as e:  # a backend's own cleanup failing: not the client's
                    log.warning("closing a backend stream failed: %r", e)
        finally:
            if self._tenant is not None:
                self._tenant.release()
            if self.on_close is not None:
                self.on_close()


async def _next(it: AsyncIterator[Piece]) -> Piece:
    try:
        return await anext(it)
    except StopAsyncIteration:
        raise StreamEndedError("the backend ended a stream before it finished") from None


async def sse_chunks(shaper: Shaper, streams: Streams) -> AsyncIterator[bytes]:
    """The SSE body. An error after the response started is sent as an error event."""
    try:
        head = shaper.role_chunks()
        if head:
            yield head
        # aclosing: if the client leaves mid-stream, the merge's pending reads are cancelled
        # before Streams.close() closes the iterators they read.
        async with contextlib.aclosing(streams.pieces()) as pieces:
            async for k, piece in pieces:
                chunk = shaper.chunk(k, piece)
                if chunk is not None:
                    yield chunk
        if shaper.plan.include_usage:
            yield shaper.usage_chunk()
    except Exception as e:
        yield shaper.error_chunk(from_exception(unwrap(e)))
    yield b"data: [DONE]\n\n"


# -- disconnects -------------------------------------------------------------------------------


async def _disconnected(receive: Receive) -> None:
    """Returns when the client has gone. A failing receive (a proxy's) counts as gone."""
    with contextlib.suppress(Exception):
        while (await receive())["type"] != "http.disconnect":
            pass


async def until_disconnect(request: Request, work: Awaitable[Response]) -> Response:
    """Run work (which must not read the request) unless the client disconnects first; then
    cancel it, which closes its backend streams. The body must have been read already."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()  # its own cleanup (finally blocks) runs as it unwinds
    if not task.done():
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return Response(status_code=499)  # nobody is listening
    return task.result()


class SSEResponse(Response):
    """A text/event-stream response that stops, and runs `close`, as soon as the client
    disconnects, whichever ASGI server or proxy runs it. `close` always runs, exactly once,
    even when the body never started."""

    media_type = "text/event-stream"

    def __init__(self, chunks: AsyncIterator[bytes], close: Callable[[], Awaitable[None]]) -> None:
        self.chunks = chunks
        self._close = close
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stream = asyncio.ensure_future(self._stream(send))
        watch = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait((stream, watch), return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            stream.cancel()  # no-op when it finished
            # Shielded: the cleanup must finish even if this task is cancelled meanwhile.
            await asyncio.shield(asyncio.ensure_future(self._finish(stream)))

    async def _stream(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        async for chunk in self.chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _finish(self, stream: asyncio.Future) -> None:
        await asyncio.wait((stream,))
        if not stream.cancelled() and stream.exception() is not None:
            log.warning("stream ended early: %r", stream.exception())
        await self.chunks.aclose()  # type: ignore[attr-defined]
        await self._close()
