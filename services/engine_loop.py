"""The engine on its own thread, driven from asyncio.

The engine is synchronous and not thread-safe; one thread owns it and steps it while there is
work. Servicers submit requests and read their outputs through asyncio queues, and run any other
engine call (prefix-cache lookups, integrity checks) on that thread with `call`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import torch

from services.engine.engine import LLMEngine
from services.engine.errors import EngineError
from services.engine.request import RequestOutput


class QueueFullError(EngineError):
    """More requests are waiting than the server admits; the caller should back off."""


class KVCapacityError(EngineError):
    """The request's context can't be held: not in the replica's KV pool, nor with what
    creditors can lend now."""


@dataclass(frozen=True)
class Load:
    running: int
    waiting: int
    free_blocks: int
    total_blocks: int

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


class EngineLoop:
    def __init__(self, engine: LLMEngine, max_waiting: int = 256) -> None:
        self.engine = engine
        self.max_waiting = max_waiting
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._pending = 0  # submitted, not yet seen by the engine thread
        self._admitting = 0  # accepted by a servicer, not yet submitted (pulling their KV)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self.steps = 0
        self.step_seconds = 0.0  # in engine.step(), on the engine thread
        self._thread.start()

    # -- asyncio side ------------------------------------------------------------------------

    async def generate(
        self, request_id: str, prompt: list[int], params, **kwargs
    ) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as the engine makes them. Leaving early (an exception, a
        cancelled client) aborts the request and frees its blocks."""
        if self.engine.num_waiting + self._pending >= self.max_waiting:
            raise QueueFullError(
                f"{self.max_waiting} requests are already waiting on this server; retry later"
            )
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        self._pending += 1
        self._cmds.put(("add", request_id, prompt, params, kwargs, loop, q))
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self._cmds.put(("abort", request_id))

    async def call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """Run fn(engine) on the engine thread and return its result."""
        fut = asyncio.get_running_loop().create_future()
        self._cmds.put(("call", fn, fut))
        return await fut

    @contextlib.contextmanager
    def admitting(self):
        """Count a request as waiting while its servicer prepares it (a decode pulling the
        prompt's KV): placement should see a replica busy with transfers as loaded."""
        self._admitting += 1
        try:
            yield
        finally:
            self._admitting -= 1

    def load(self) -> Load:
        e = self.engine
        waiting = e.num_waiting + self._pending + self._admitting
        return Load(e.num_running, waiting, e.num_free_blocks, e.num_kv_blocks)

    def stop(self) -> None:
        self._stop.set()
        self._cmds.put(("wake",))
        self._thread.join(timeout=10)

    # -- engine thread -----------------------------------------------------------------------

    def _run(self) -> None:
        e = self.engine
        dev = torch.device(e.device)
        if dev.type == "cuda" and dev.index is not None:
            # Kernels launched from this thread (Triton, graph replays) run on the current
            # device, which is per thread: make it the engine's (cuda:1 on a two-GPU host).
            torch.cuda.set_device(dev)
        while not self._stop.is_set():
            self._drain(block=not e.has_unfinished())
            if self._stop.is_set() or not e.has_unfinished():
                continue
            t = time.perf_counter()
            try:
                outs = e.step()
            except Exception as exc:  # a bug, not bad input: fail the affected requests loudly
                for rid in list(self._streams):
                    e.abort(rid)
                    self._send(rid, RuntimeError(f"engine step failed: {exc}"), final=True)
                continue
            self.steps += 1
            self.step_seconds += time.perf_counter() - t
            if not outs and e.num_running == 0 and e.num_waiting:
                # Waiting for memory that isn't there yet (lenders busy or unreachable): poll
                # at a gentle pace rather than spin, still woken at once by any command.
                self._drain(block=True, timeout=0.05)
            for out in outs:
                if out.error is not None:
                    self._send(out.request_id, KVCapacityError(out.error), final=True)
                else:
                    self._send(out.request_id, out, final=out.finished)

    def _drain(self, block: bool, timeout: float = 0.5) -> None:
        try:
            cmd = self._cmds.get(timeout=timeout) if block else self._cmds.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(cmd)
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                return

    def _handle(self, cmd: tuple) -> None:
        kind = cmd[0]
        if kind == "add":
            _, rid, prompt, params, kwargs, loop, q = cmd
            self._pending -= 1
            self._streams[rid] = (loop, q)
            try:
                self.engine.add_request(
                    rid, prompt, params, arrival_time=time.monotonic(), **kwargs
                )
            except Exception as exc:
                self._send(rid, exc, final=True)
        elif kind == "abort":
            self.engine.abort(cmd[1])
            self._streams.pop(cmd[1], None)
        elif kind == "call":
            _, fn, fut = cmd
            try:
                res, err = fn(self.engine), None
            except Exception as exc:
                res, err = None, exc
            with contextlib.suppress(RuntimeError):
                fut.get_loop().call_soon_threadsafe(_set, fut, res, err)

    def _send(self, rid: str, item, final: bool) -> None:
        entry = self._streams.pop(rid, None) if final else self._streams.get(rid)
        if entry is not None:
            loop, q = entry
            with contextlib.suppress(RuntimeError):  # the caller's loop is gone
                loop.call_soon_threadsafe(q.put_nowait, item)


def _set(fut: asyncio.Future, result, exc) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)
