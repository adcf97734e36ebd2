"""`splitserve up` as a benchmark drives it: in its own process session on free loopback
ports, its URL read from its first stdout line, stopped with SIGINT (as Ctrl-C would) on exit.

Also the processes it runs, found as an operator would find them: all of them by its session
(Ray's workers and the private Redis server included), a replica by the port it listens on,
the private Redis server by its port."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from rpc.ports import free_port as free_port  # for the tests and benchmarks that import it here


@dataclass
class Up:
    url: str  # the HTTP base URL
    proc: subprocess.Popen
    stderr: list[str] = field(default_factory=list)

    @property
    def redis(self) -> str | None:
        """The private Redis server's URL, as `up` said it on stderr (None: --redis given)."""
        said = [line for line in self.stderr if "private Redis-compatible server at" in line]
        return said[0].rsplit(" ", 1)[-1].strip() if said else None


@contextlib.contextmanager
def up_session(*args: str, stop_timeout_s: float = 90.0) -> Iterator[Up]:
    """`splitserve up ARGS` once it has printed its URL; its stderr is collected as it comes."""
    cmd = [sys.executable, "-m", "splitserve.cli", "up", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    up = Up("", proc)
    reader = threading.Thread(target=lambda: up.stderr.extend(proc.stderr or ()), daemon=True)
    reader.start()
    try:
        up.url = proc.stdout.readline().strip() if proc.stdout else ""
        if not up.url.startswith("http"):
            reader.join(10)
            tail = "".join(up.stderr)[-2000:]
            raise RuntimeError(f"splitserve up {' '.join(args)} did not start:\n{tail}")
        yield up
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(stop_timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def config_session(cfg: dict, stop_timeout_s: float = 90.0) -> Iterator[Up]:
    """`splitserve up --config` with cfg (an app config) written to a file, once it serves and
    its private Redis server's URL, if it runs one, has been read from its stderr."""
    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "app.yaml"
        path.write_text(yaml.safe_dump(cfg))
        with up_session("--config", str(path), stop_timeout_s=stop_timeout_s) as up:
            for _ in range(50):  # its stderr is read on another thread
                if up.redis:
                    break
                time.sleep(0.1)
            yield up


@contextlib.contextmanager
def splitserve_up(*args: str, stop_timeout_s: float = 90.0) -> Iterator[str]:
    """Yields the HTTP base URL of `splitserve up ARGS` once it has printed it."""
    with up_session(*args, stop_timeout_s=stop_timeout_s) as up:
        yield up.url


def session_pids(sid: int) -> list[int]:
    """Every live process of a session (`up` started in its own: sid is its pid)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            with contextlib.suppress(OSError):
                if os.getsid(int(d)) == sid:
                    out.append(int(d))
    return out


def listening_pid(port: int) -> int:
    """The process listening on a TCP port of this host (a replica's gRPC server)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                f = line.split()
                if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                    inodes.add(f"socket:[{f[9]}]")
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{d}/fd"):
                if os.readlink(f"/proc/{d}/fd/{fd}") in inodes:
                    return int(d)
    raise LookupError(f"no process listens on port {port}")


def redis_pid(sid: int, redis_url: str) -> int:
    """The private Redis server `up` runs: in up's session, named for its port (the server
    rewrites its command line to `valkey-server HOST:PORT`)."""
    port = redis_url.rsplit(":", 1)[-1].split("/")[0]
    for pid in session_pids(sid):
        with contextlib.suppress(OSError):
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            if b"-server" in cmd and f":{port}".encode() in cmd:
                return pid
    raise LookupError(f"no Redis server on port {port} in session {sid}")
