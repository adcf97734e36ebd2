"""A real Prometheus (Debian's `prometheus` package, which scripts/setup.sh test installs)
scraping targets on loopback, for the dashboard tests: started on a free port with its data
in a temporary directory, stopped (and waited for) at the end."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.router_helpers import free_port


def prometheus_binary() -> str:
    path = shutil.which("prometheus") or (
        "/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None
    )
    if path is None:
        pytest.fail("prometheus is not installed: run scripts/setup.sh test (apt: prometheus)")
    return path


@contextlib.contextmanager
def running_prometheus(targets: list[str], workdir: Path, interval_s: int = 1) -> Iterator[str]:
    """Prometheus scraping `targets` (host:port) every interval_s; yields its base URL."""
    port = free_port()
    cfg = workdir / "prometheus.yml"
    cfg.write_text(json.dumps({
        "global": {"scrape_interval": f"{interval_s}s", "scrape_timeout": f"{interval_s}s"},
        "scrape_configs": [{"job_name": "splitserve", "static_configs": [{"targets": targets}]}],
    }))  # fmt: skip
    log = (workdir / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [prometheus_binary(), f"--config.file={cfg}", f"--storage.tsdb.path={workdir / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail(f"prometheus did not start: {(workdir / 'prometheus.log').read_text()}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def query(url: str, path: str, **params) -> dict:
    q = urllib.parse.urlencode(params)
    with urllib.request.urlopen(f"{url}/api/v1/{path}?{q}", timeout=30) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]
