"""One bidirectional gRPC session stream driven from a synchronous thread: requests in order,
responses matched to futures by id, a reader thread per stream.

The decoder's lending streams (services/attention_client.py) and the model worker's offload
streams (services/offload_client.py) are both this. A stream that breaks (the peer died) fails
every future still waiting, and every later send, with the error `lost(why)` makes.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future

import grpc

from rpc.channel import GRPC_OPTIONS


class SessionStream:
    def __init__(
        self,
        name: str,
        address: str,
        open_session: Callable[[grpc.Channel], Callable],
        make_request: Callable[..., object],
        lost: Callable[[str], Exception],
        on_response: Callable[[object], None] | None = None,
    ) -> None:
        """open_session(channel) is the stub's stream method; make_request(id=..., **body)
        builds a request; on_response sees every response first (reclaims ride on them)."""
        self.name = name
        self.channel = grpc.insecure_channel(address, options=GRPC_OPTIONS)
        self._make = make_request
        self._lost = lost
        self._on_response = on_response
        self._out: queue.SimpleQueue = queue.SimpleQueue()
        self._ids = itertools.count(1)
        self._waiting: dict[int, Future] = {}
        self._lock = threading.Lock()
        self.broken: str | None = None
        self.ipc = None  # the owner's shared buffers with the peer, closed with the stream
        self._responses = open_session(self.channel)(iter(self._out.get, None))
        self._reader = threading.Thread(target=self._read, name=f"stream-{name}", daemon=True)
        self._reader.start()

    def send(self, want_answer: bool = True, **body) -> Future:
        """Queue a request; its future gets the response with its id (want_answer False: no
        response is expected, the future only carries a broken stream's error)."""
        fut: Future = Future()
        with self._lock:
            if self.broken is not None:
                fut.set_exception(self._lost(self.broken))
                return fut
            rid = next(self._ids)
            if want_answer:
                self._waiting[rid] = fut
        self._out.put(self._make(id=rid, **body))
        return fut

    def _read(self) -> None:
        why = "its stream ended"
        try:
            for resp in self._responses:
                if self._on_response is not None:
                    self._on_response(resp)
                with self._lock:
                    fut = self._waiting.pop(resp.id, None)
                if fut is not None:
                    fut.set_result(resp)
        except grpc.RpcError as e:
            why = f"{e.code().name}: {e.details()}"
        with self._lock:
            self.broken = why
            waiting, self._waiting = self._waiting, {}
        for fut in waiting.values():
            fut.set_exception(self._lost(why))

    def close(self) -> None:
        self._out.put(None)
        self.channel.close()
        self._reader.join(timeout=5)
        for pair in self.ipc or ():
            for buf in pair if isinstance(pair, tuple) else (pair,):
                buf.close()
