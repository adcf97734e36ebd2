"""`splitserve up` as a user runs it, for the end-to-end tests: started in its own session,
its URL read from stdout, its private Redis from stderr, and stopped with Ctrl-C."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import pytest


def start_up(args: list[str]) -> dict:
    """Run `splitserve up ARGS`; returns {"url", "redis", "proc", "stderr"} once it serves
    (fails the test with its stderr if it doesn't)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "splitserve.cli", "up", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    stderr: list[str] = []
    reader = threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True)
    reader.start()
    url = proc.stdout.readline().strip()
    if not url.startswith("http://"):
        proc.kill()
        reader.join(10)
        pytest.fail(f"splitserve up did not come up: {''.join(stderr)[-3000:]}")
    # Said on stderr before Ray starts, so long before the URL: the reader has it by now.
    said = [line for line in stderr if "private Redis-compatible server at" in line]
    redis = said[0].rsplit(" ", 1)[-1].strip() if said else None
    return {"url": url, "redis": redis, "proc": proc, "stderr": stderr}


def stop_up(proc: subprocess.Popen, check_left: bool = True) -> None:
    """Ctrl-C, then (check_left) nothing it started is left behind: its whole session."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(90)
    finally:
        proc.kill()
    if not check_left:
        return
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        left = subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True, text=True)
        if not left.stdout.strip():
            break
        time.sleep(0.5)
    assert not left.stdout.strip(), f"processes left behind: {left.stdout}"
