"""Pieces of the request-migration tests: decode replicas whose streams stop mid-way on cue, so a
test can kill (or drain) one while it is known to be in the middle of every request it serves,
however fast or slow the machine is.

A paused replica sends each new request's first `after` decode messages, then holds the stream
(the engine may finish the sequence meanwhile; nothing more reaches the router) until the
replica dies or stops. Resumed requests are never held. In its own process (for SIGKILL):

    python -m tests.migration_helpers --model DIR --redis URL --namespace NS --after N
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
from pathlib import Path

from services.decode import DecodeServicer

HOLD_S = 300.0  # a held stream's bound if nobody ends it (the tests end it in seconds)

_decode = DecodeServicer._decode


async def held_decode(self, request, rec):
    """DecodeServicer._decode, holding the stream where its replica says (hold_streams)."""
    after = getattr(self.loop, "hold_after", None)
    n = 0
    async for msg in _decode(self, request, rec):
        yield msg
        n += 1
        if after is not None and n == after and not request.resume_token_ids:
            await asyncio.sleep(HOLD_S)


def hold_streams(server, after: int) -> None:
    """Hold this decode replica's streams after `after` messages (with held_decode in place
    of DecodeServicer._decode: monkeypatch it in a test's process)."""
    server.loop.hold_after = after


def spawn_paused_decode(
    model_dir: Path, redis_url: str, namespace: str, after: int
) -> tuple[subprocess.Popen, str]:
    """A paused decode replica in its own process; returns it and its address."""
    cmd = [sys.executable, "-m", "tests.migration_helpers", "--model", str(model_dir),
           "--redis", redis_url, "--namespace", namespace, "--after", str(after)]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()  # the address, or "" if it died first
    if not line:
        proc.kill()
        err = proc.stderr.read() if proc.stderr else ""
        raise RuntimeError(f"the paused decode replica did not start: {err[-3000:]}")
    return proc, line


def main() -> None:
    from rpc.server import run_until_signal
    from tests.replica_helpers import decode_server

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--redis", required=True)
    ap.add_argument("--namespace", required=True)
    ap.add_argument("--after", type=int, required=True)
    a = ap.parse_args()
    DecodeServicer._decode = held_decode  # type: ignore[method-assign]
    server = decode_server(Path(a.model), a.redis, a.namespace)
    hold_streams(server, a.after)
    asyncio.run(run_until_signal(server.start, server.stop, lambda addr: print(addr, flush=True)))


if __name__ == "__main__":
    main()
