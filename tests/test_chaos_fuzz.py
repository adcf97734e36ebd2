"""bench/chaos_fuzz.py against a server that is gone: every attempt counts as a server
failure, nothing raises, and the time bound holds."""

from __future__ import annotations

import time

from bench import chaos_fuzz
from bench.up_process import free_port


def test_a_dead_server_is_all_failures_and_run_returns_in_time():
    port = free_port()  # nothing listens there
    t0 = time.monotonic()
    got = chaos_fuzz.run(f"http://127.0.0.1:{port}", f"127.0.0.1:{port}", 2.0)
    assert time.monotonic() - t0 < 30
    seen = got["statuses"]
    # A call that gives up after 50 ms may do so before the refusal (on a loaded machine every
    # one can): the client's own status.
    assert set(seen) <= {"openapi.json unreachable", "UNAVAILABLE", "DEADLINE_EXCEEDED"}, got
    assert seen["openapi.json unreachable"] == 1, got
    assert seen.get("UNAVAILABLE", 0) + seen.get("DEADLINE_EXCEEDED", 0) >= 1, got
    assert got["status_5xx"] == got["requests"] - seen.get("DEADLINE_EXCEEDED", 0), got
