"""`splitserve up` as a benchmark drives it: in its own process session on free loopback
ports, its URL read from its first stdout line, stopped with SIGINT (as Ctrl-C would) on exit."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def splitserve_up(*args: str, stop_timeout_s: float = 90.0) -> Iterator[str]:
    """Yields the HTTP base URL of `splitserve up ARGS` once it has printed it."""
    cmd = [sys.executable, "-m", "splitserve.cli", "up", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        url = proc.stdout.readline().strip() if proc.stdout else ""
        if not url.startswith("http"):
            raise RuntimeError(f"splitserve up {' '.join(args)} did not start")
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(stop_timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
