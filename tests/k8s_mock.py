"""A Kubernetes API server for tests, on loopback: the read paths `splitserve k8s` uses
(RayService, pods, EndpointSlices, StatefulSets) over objects the test puts in `objects`, with
equality label selectors, Status bodies for what is missing, and a log of requests. No cluster
runs here; this speaks the same HTTP API the kubernetes client calls."""

from __future__ import annotations

import contextlib
import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import yaml

# (path pattern, resource key, list kind)
ROUTES = [
    (r"^/apis/ray\.io/v1/namespaces/(?P<ns>[^/]+)/rayservices/(?P<name>[^/]+)$", "rayservices", ""),
    (r"^/api/v1/namespaces/(?P<ns>[^/]+)/pods$", "pods", "PodList"),
    (r"^/apis/discovery\.k8s\.io/v1/namespaces/(?P<ns>[^/]+)/endpointslices$", "endpointslices",
     "EndpointSliceList"),
    (r"^/apis/apps/v1/namespaces/(?P<ns>[^/]+)/statefulsets/(?P<name>[^/]+)$", "statefulsets", ""),
]  # fmt: skip


class MockKube:
    def __init__(self) -> None:
        self.objects: dict[str, list[dict]] = {k: [] for _, k, _ in ROUTES}
        self.requests: list[str] = []
        self.lock = threading.Lock()

    def put(self, resource: str, obj: dict) -> None:
        with self.lock:
            items = self.objects[resource]
            key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
            items[:] = [
                o for o in items if (o["metadata"]["namespace"], o["metadata"]["name"]) != key
            ]
            items.append(obj)

    def answer(self, path: str, query: dict) -> tuple[int, dict]:
        for pattern, resource, list_kind in ROUTES:
            m = re.match(pattern, path)
            if not m:
                continue
            ns = m.group("ns")
            with self.lock:
                items = [o for o in self.objects[resource] if o["metadata"]["namespace"] == ns]
            if not list_kind:
                name = m.group("name")
                for o in items:
                    if o["metadata"]["name"] == name:
                        return 200, o
                return 404, _status(404, "NotFound", f'{resource} "{name}" not found')
            sel = _selector(query.get("labelSelector", [""])[0])
            hits = [o for o in items if sel.items() <= (o["metadata"].get("labels") or {}).items()]
            return 200, {"kind": list_kind, "apiVersion": "v1", "metadata": {}, "items": hits}
        return 404, _status(404, "NotFound", f"the server could not find {path}")


def _selector(text: str) -> dict[str, str]:
    out = {}
    for part in filter(None, text.split(",")):
        k, _, v = part.partition("=")
        out[k.strip()] = v.strip()
    return out


def _status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message,
            "reason": reason, "code": code}  # fmt: skip


@contextlib.contextmanager
def mock_kube(workdir: Path) -> Iterator[tuple[MockKube, Path]]:
    """A running mock API server; yields it and a kubeconfig file pointing at it."""
    kube = MockKube()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            u = urlparse(self.path)
            kube.requests.append(u.path)
            if self.headers.get("Authorization") != "Bearer test-token":
                code, body = 401, _status(401, "Unauthorized", "Unauthorized")
            else:
                code, body = kube.answer(u.path, parse_qs(u.query))
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    kubeconfig = workdir / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "mock",
        "clusters": [{"name": "mock",
                      "cluster": {"server": f"http://127.0.0.1:{httpd.server_port}"}}],
        "users": [{"name": "mock", "user": {"token": "test-token"}}],
        "contexts": [{"name": "mock", "context": {"cluster": "mock", "user": "mock"}}],
    }))  # fmt: skip
    try:
        yield kube, kubeconfig
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)
