"""A same-host control channel for attention offload: length-framed protobuf messages over a
UNIX socket, read and written by the threads that use them (no gRPC thread hops per message).

The gRPC stream sets the session up (attach, shared buffers); with both sides on one host the
per-layer traffic then goes here: each message is a 4-byte little-endian length and the
serialized message. The listening socket is a file only until its one peer connects.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
import struct
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

log = logging.getLogger(__name__)

_LEN = struct.Struct("<I")
ACCEPT_S = 30.0  # how long a served link waits for its one peer to connect
MAX_FRAME = 1 << 30


class LinkClosed(ConnectionError):
    """The peer closed the socket or it broke."""


def listen(root: Path | None = None) -> tuple[socket.socket, str]:
    """A listening socket for one peer, and its path."""
    root = root or Path(tempfile.gettempdir())
    path = str(root / f"splitserve-link-{uuid.uuid4().hex[:16]}.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    os.chmod(path, 0o600)
    srv.listen(1)
    return srv, path


def accept(srv: socket.socket, path: str, timeout_s: float) -> socket.socket:
    """The one peer's connection; the file goes once it is in (or on timeout)."""
    srv.settimeout(timeout_s)
    try:
        conn, _ = srv.accept()
    finally:
        srv.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
    conn.settimeout(None)
    return conn


def connect(path: str, timeout_s: float) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout_s)
    s.connect(path)
    return s


def send(sock: socket.socket, msg) -> None:
    data = msg.SerializeToString()
    try:
        sock.sendall(_LEN.pack(len(data)) + data)
    except OSError as e:
        raise LinkClosed(str(e)) from None


def recv(sock: socket.socket, parse):
    """The next message (parse(bytes) makes it); LinkClosed at the end of the stream."""
    (n,) = _LEN.unpack(_exactly(sock, _LEN.size))
    if n > MAX_FRAME:
        raise LinkClosed(f"a frame of {n} bytes")
    return parse(_exactly(sock, n))


def _exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        try:
            k = sock.recv_into(view[got:])
        except TimeoutError:
            raise
        except OSError as e:
            raise LinkClosed(str(e)) from None
        if k == 0:
            raise LinkClosed("the peer closed the link")
        got += k
    return bytes(buf)


class LinkClient:
    """The requesting end of a link, used by one thread: requests written and answers read by
    that thread itself, in order. Answers nobody waits for (a step's OK) are read and dropped."""

    def __init__(self, sock: socket.socket, request_cls, parse_response, lost, seen=None) -> None:
        """lost(why) makes the exception a broken link raises; seen(response) is called for
        every response read, awaited or not."""
        self.sock = sock
        self.request_cls = request_cls
        self.parse = parse_response
        self.lost = lost
        self.seen = seen
        self.broken: str | None = None
        self._ids = itertools.count(1 << 32)  # apart from the gRPC stream's ids
        self._awaited: set[int] = set()
        self._got: dict = {}

    def send(self, want_answer: bool = True, **body) -> int:
        if self.broken is not None:
            raise self.lost(self.broken)
        rid = next(self._ids)
        if want_answer:
            self._awaited.add(rid)
        try:
            send(self.sock, self.request_cls(id=rid, **body))
        except LinkClosed as e:
            self.broken = str(e)
            raise self.lost(self.broken) from None
        return rid

    def wait(self, rid: int):
        """The answer to request rid; raises lost(...) if the link breaks or times out."""
        try:
            while rid not in self._got:
                if self.broken is not None:
                    raise self.lost(self.broken)
                resp = recv(self.sock, self.parse)
                if self.seen is not None:
                    self.seen(resp)
                if resp.id in self._awaited:
                    self._got[resp.id] = resp
        except (LinkClosed, TimeoutError) as e:
            self.broken = str(e) or "no answer in time"
            raise self.lost(self.broken) from None
        self._awaited.discard(rid)
        return self._got.pop(rid)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class LinkServer:
    """The serving end of a link, on a thread of its own: waits up to accept_s for its one
    peer, then handles each request in order (handle returns the responses to send) until the
    peer goes or close() is called. setup runs first on that thread (e.g. the CUDA device)."""

    def __init__(
        self, name: str, parse, handle: Callable[[object], Iterable],
        setup: Callable[[], None] | None = None, accept_s: float = ACCEPT_S,
    ) -> None:  # fmt: skip
        self.accept_s = accept_s
        self._srv, self.path = listen()
        self._conn: socket.socket | None = None
        self._parse, self._handle, self._setup = parse, handle, setup
        self._thread = threading.Thread(target=self._serve, name=f"link-{name}", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            if self._setup is not None:
                self._setup()
            self._conn = accept(self._srv, self.path, self.accept_s)
            while True:
                for resp in self._handle(recv(self._conn, self._parse)):
                    send(self._conn, resp)
        except (LinkClosed, TimeoutError, OSError) as e:
            log.debug("local link %s ended: %s", self.path, e)
        except Exception:  # a bug here must not pass silently: the peer sees EOF
            log.exception("local link %s failed", self.path)
        finally:
            if self._conn is not None:
                self._conn.close()
            else:  # it failed before its peer came in: the peer sees the link refused
                self._srv.close()
                with contextlib.suppress(OSError):
                    os.unlink(self.path)

    def close(self) -> None:
        """End the link and wait for its thread to leave the handler (a peer that never
        connected: the waiting accept ends too)."""
        if self._conn is None:  # still waiting in accept: a connection that closes ends it
            with contextlib.suppress(OSError):
                connect(self.path, 1.0).close()
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=self.accept_s + 5)
