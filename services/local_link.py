"""A same-host control channel for attention offload: length-framed protobuf messages over a
UNIX socket, read and written by the threads that use them (no gRPC thread hops per message).

The gRPC stream sets the session up (attach, shared buffers); with both sides on one host the
per-layer traffic then goes here: each message is a 4-byte little-endian length and the
serialized message. The listening socket is a file only until its one peer connects.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import tempfile
import uuid
from pathlib import Path

_LEN = struct.Struct("<I")
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
