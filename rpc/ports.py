"""Ports picked now for a server that binds later (a config written before its processes start).

A port the kernel hands out for a bind to port 0 comes from its ephemeral range, the same range
every later bind to port 0 (gRPC servers, Ray's workers) and every outgoing connection draws
from: between the pick and the bind, any of them may take it, and the server that was meant to
have it then fails to bind, or a scraper finds some other protocol there. So the pick comes
from below that range, where only an explicit bind can land."""

from __future__ import annotations

import random
import socket
import threading
from pathlib import Path

_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LOWEST = 10000  # below this lie the well-known defaults of many servers
_given: set[int] = set()
_random = (
    random.Random()
)  # its own: a test that seeds the module's must not make every process pick alike
_lock = threading.Lock()


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for ports bound to 0 (Linux's default where it cannot be read)."""
    try:
        lo, hi = (int(x) for x in _RANGE_FILE.read_text().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


def _bindable(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1", tries: int = 200) -> int:
    """A port of `host` that is free now, outside the ephemeral range, and not given before by
    this process. Falls back to one the kernel picks where no range lies below (a machine
    configured to make every port ephemeral)."""
    lo, _ = ephemeral_range()
    if lo - 1 > _LOWEST:
        with _lock:
            for _ in range(tries):
                port = _random.randint(_LOWEST, lo - 1)
                if port not in _given and _bindable(host, port):
                    _given.add(port)
                    return port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
