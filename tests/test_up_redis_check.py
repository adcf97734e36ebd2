"""`splitserve up` given a Redis that does not answer stops at once with a clear error (before
Ray or any replica starts) instead of coming up unable to place a request; a Redis that
answers, or one that comes up within the wait, is taken."""

from __future__ import annotations

import threading

import pytest
from typer.testing import CliRunner

from splitserve import up
from splitserve.cli import app
from tests.router_helpers import free_port


@pytest.mark.parametrize("url", ["redis://127.0.0.1:1", "nonsense://x"])
def test_up_with_an_unreachable_redis_fails_clearly(monkeypatch, url):
    monkeypatch.setattr(up, "REDIS_WAIT_S", 0.5)
    args = ["up", "--model", "tiny", "--redis", url, "--port", str(free_port()),
            "--grpc-port", str(free_port())]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    assert "error:" in res.output and "does not answer" in res.output and url in res.output
    assert "Traceback" not in res.output


def test_a_redis_that_answers_in_the_wait_is_taken(fresh_redis):
    up.check_redis(fresh_redis.url, wait_s=0)
    fresh_redis.stop()
    with pytest.raises(ConnectionError, match="does not answer"):
        up.check_redis(fresh_redis.url, wait_s=0)
    later = threading.Timer(0.5, fresh_redis.start)
    later.start()
    try:
        up.check_redis(fresh_redis.url, wait_s=30)
    finally:
        later.join()
