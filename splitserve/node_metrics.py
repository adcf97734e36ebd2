"""One /metrics per node, on a known port, for every replica of the node.

Ray places several replicas (router, prefill, decode, colocated, attention) in processes of
one node, each with a registry of its own served on a free port. A scraper outside (a
PodMonitor, `splitserve up`'s user) needs one fixed port per node instead. Every replica
process joins its node's group: it writes where its registry is served into a directory of
the node, and one of them (the first to bind the known port) serves the group's /metrics,
fetching the others' at scrape time and labelling every sample with the replica's name
(`replica`). When that process goes, another member binds the port within RETRY_S.

    cfg = NodeMetricsConfig(9321, scope="splitserve redis://10.0.0.5:6379")
    node = NodeMetrics.join(cfg, "decode-1a2b3c4d", registry, "127.0.0.1:4242")
    ...
    node.close()
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import tempfile
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

log = logging.getLogger(__name__)

RETRY_S = 2.0  # how often a member tries to take the port over
FETCH_TIMEOUT_S = 2.0
REPLICA_LABEL = "replica"
TEXT_FORMAT = "text/plain; version=0.0.4; charset=utf-8"  # what every Prometheus parses


@dataclass(frozen=True)
class NodeMetricsConfig:
    """port: the node's known /metrics port (0: no node endpoint). scope: what makes one
    cluster's group distinct from another's on the same host (its namespace and Redis). host:
    where the port listens (0.0.0.0 in a cluster, for the scraper)."""

    port: int
    scope: str = ""
    host: str = "127.0.0.1"

    def directory(self) -> Path:
        digest = hashlib.sha1(self.scope.encode()).hexdigest()[:10]
        return Path(tempfile.gettempdir()) / f"splitserve-metrics-{self.port}-{digest}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _loopback(address: str) -> str:
    """A member's address as seen from its own node (a wildcard bind answers on loopback)."""
    host, _, port = address.rpartition(":")
    if host.strip("[]") in ("0.0.0.0", "::", ""):
        return f"127.0.0.1:{port}"
    return address


class _GroupCollector(Collector):
    """The group's families, merged by name; each sample gains its replica's name."""

    def __init__(self, node: NodeMetrics) -> None:
        self.node = node

    def collect(self):
        merged: dict[str, Metric] = {}
        for name, families in self.node.members():
            for fam in families:
                if fam.name.endswith("_created"):
                    continue  # a member's counter timestamps, parsed back as gauges: dropped
                out = merged.get(fam.name)
                if out is None:
                    out = merged[fam.name] = Metric(fam.name, fam.documentation, fam.type)
                for s in fam.samples:
                    if s.name.endswith("_created"):
                        continue  # likewise: one series name must not carry two types
                    labels = {**s.labels, REPLICA_LABEL: name}
                    out.samples.append(Sample(s.name, labels, s.value, s.timestamp, s.exemplar))
        yield from merged.values()


class NodeMetrics:
    """This process's membership of its node's group (see the module's docstring)."""

    def __init__(
        self, config: NodeMetricsConfig, name: str, registry: CollectorRegistry, address: str
    ) -> None:
        self.config = config
        self.name = name
        self.registry = registry
        self.address = _loopback(address)
        self.dir = config.directory()
        self._file = self.dir / f"{name}.json"
        self._hub = None
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def join(
        cls, config: NodeMetricsConfig, name: str, registry: CollectorRegistry, address: str
    ) -> NodeMetrics:
        """Join the group with `registry`, which this process already serves at `address`."""
        node = cls(config, name, registry, address)
        node.dir.mkdir(parents=True, exist_ok=True)
        tmp = node._file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"address": node.address, "pid": os.getpid()}))
        tmp.replace(node._file)
        if not node._try_serve():
            node._thread = threading.Thread(target=node._take_over, daemon=True)
            node._thread.start()
        return node

    @property
    def serving(self) -> bool:
        """Whether this process serves the node's port now."""
        return self._hub is not None

    def _try_serve(self) -> bool:
        reg = CollectorRegistry(auto_describe=False)
        reg.register(_GroupCollector(self))
        try:
            self._hub = _serve_text_format(reg, self.config.host, self.config.port)
        except OSError:
            return False
        log.info("node /metrics on %s:%d", self.config.host, self.config.port)
        return True

    def _take_over(self) -> None:
        while not self._closed.wait(RETRY_S):
            if self._try_serve():
                return

    def members(self):
        """(name, metric families) of every live member, this process's own read directly,
        the others fetched at once (a scrape waits for the slowest, not for their sum)."""
        others = []
        own = None
        for f in sorted(self.dir.glob("*.json")):
            try:
                info = json.loads(f.read_text())
            except (OSError, ValueError):
                continue  # written or removed under us
            if f.stem == self.name:
                own = list(self.registry.collect())
            elif _alive(int(info.get("pid", 0))):
                others.append((f.stem, info["address"]))
            else:
                with contextlib.suppress(OSError):
                    f.unlink()
        if own is not None:
            yield self.name, own
        if not others:
            return
        with ThreadPoolExecutor(min(len(others), 16)) as pool:
            for name, families in pool.map(_fetch, others):
                if families is not None:
                    yield name, families

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._file.unlink()
        if self._hub is not None:
            httpd, thread = self._hub
            self._hub = None
            httpd.shutdown()
            httpd.server_close()
            thread.join(timeout=5)
        if self._thread is not None:
            self._thread.join(timeout=RETRY_S + 1)


def _fetch(member: tuple[str, str]) -> tuple[str, list | None]:
    name, address = member
    try:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=FETCH_TIMEOUT_S) as r:
            text = r.read().decode()
    except (OSError, ValueError) as e:
        log.debug("node metrics: %s not read: %s", name, e)
        return name, None  # starting or stopping: its samples are missing from this scrape
    return name, list(text_string_to_metric_families(text))


def _serve_text_format(registry: CollectorRegistry, host: str, port: int):
    """/metrics in the Prometheus text format (0.0.4) whatever the scraper accepts:
    prometheus_client's OpenMetrics writer turns the `:` of `splitserve:*` sample names into
    `_` (while its HELP and TYPE lines keep them), so the names a scraper stores would not be
    the ones docs/metrics.md and the dashboards use."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] not in ("/metrics", "/"):
                self.send_error(404, "only /metrics here")
                return
            body = generate_latest(registry)
            self.send_response(200)
            self.send_header("Content-Type", TEXT_FORMAT)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args) -> None:
            pass  # one line per scrape would flood the replica's log

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server_cls = type(
        "Server", (ThreadingHTTPServer,), {"address_family": family, "daemon_threads": True}
    )
    httpd = server_cls((host, port), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    return httpd, thread


def serve_registry(registry: CollectorRegistry, host: str = "127.0.0.1") -> tuple[str, object]:
    """Serve a registry on a free port of `host` (a process whose registry has no endpoint
    yet, e.g. the router's); returns (host:port, the server to shut down)."""
    httpd, thread = start_http_server(0, addr=host, registry=registry)
    return f"{host}:{httpd.server_port}", (httpd, thread)


def port_free(host: str, port: int) -> bool:
    """Whether `port` can be bound on `host` now (what `splitserve up` checks before it says
    where the node's /metrics will be)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True
