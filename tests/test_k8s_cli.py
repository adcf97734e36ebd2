"""`splitserve k8s status` and `wait` through the kubernetes client against a mock API server
holding what the chart renders (the RayService of an example values file, its Ray pods with
the chart's labels and GPU limits, EndpointSlices, the Redis StatefulSet)."""

from __future__ import annotations

import copy
import json
import threading
import time

import pytest
import yaml
from typer.testing import CliRunner

from splitserve.cli import app
from splitserve.k8s import fullname
from tests.helm_helpers import ROOT, render
from tests.k8s_mock import mock_kube

NS, REL = "llm", "rel"
NAME = fullname(REL)


def _pod(template: dict, name: str, ready: bool) -> dict:
    spec = copy.deepcopy(template["spec"])
    for c in spec["containers"]:  # the API server answers quantities as strings
        for part in ("requests", "limits"):
            q = c.get("resources", {}).get(part) or {}
            q.update({k: str(v) for k, v in q.items()})
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": template["metadata"]["labels"]},
        "spec": {**spec, "nodeName": f"node-{name[-1]}"},
        "status": {"phase": "Running" if ready else "Pending",
                   "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }  # fmt: skip


def _slice(svc: str, ready: int) -> dict:
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
        "metadata": {"name": f"{svc}-abc", "namespace": NS,
                     "labels": {"kubernetes.io/service-name": svc}},
        "endpoints": [{"addresses": [f"10.0.0.{i}"], "conditions": {"ready": True}}
                      for i in range(ready)],
    }  # fmt: skip


def _ready_status() -> dict:
    deps = {f"{r}-llama-3.1-8b-instruct": {"status": "HEALTHY"} for r in ("prefill", "decode")}
    return {
        "serviceStatus": "Running", "numServeEndpoints": 2,
        "conditions": [{"type": "Ready", "status": "True", "reason": "RunningServeDeployments"}],
        "activeServiceStatus": {"applicationStatuses": {"splitserve": {
            "status": "RUNNING",
            "serveDeploymentStatuses": {**deps, "router": {"status": "HEALTHY"}}}}},
    }  # fmt: skip


@pytest.fixture
def cluster(tmp_path):
    values = yaml.safe_load((ROOT / "deploy/helm/examples/values-gpu-pd.yaml").read_text())
    docs = render(values, name=REL, namespace=NS)
    rs = next(d for d in docs if d["kind"] == "RayService")
    sts = next(d for d in docs if d["kind"] == "StatefulSet")
    with mock_kube(tmp_path) as (kube, kubeconfig):
        waiting = {"type": "Ready", "status": "False", "message": "waiting for the head pod"}
        rs = {**rs, "metadata": {**rs["metadata"], "namespace": NS},
              "status": {"serviceStatus": "", "conditions": [waiting]}}  # fmt: skip
        kube.put("rayservices", rs)
        rc = rs["spec"]["rayClusterConfig"]
        kube.put("pods", _pod(rc["headGroupSpec"]["template"], "rel-head-0", ready=False))
        kube.put("pods", _pod(rc["workerGroupSpecs"][0]["template"], "rel-gpu-1", ready=False))
        kube.put("statefulsets", {**sts, "metadata": {**sts["metadata"], "namespace": NS},
                                  "status": {"replicas": 1, "readyReplicas": 1}})  # fmt: skip
        yield kube, kubeconfig, rs


def _run(kubeconfig, *args):
    return CliRunner().invoke(
        app, ["k8s", *args, "--namespace", NS, "--release", REL, "--kubeconfig", str(kubeconfig)]
    )


def _become_ready(kube, rs) -> None:
    kube.put("rayservices", {**rs, "status": _ready_status()})
    rc = rs["spec"]["rayClusterConfig"]
    kube.put("pods", _pod(rc["headGroupSpec"]["template"], "rel-head-0", ready=True))
    kube.put("pods", _pod(rc["workerGroupSpecs"][0]["template"], "rel-gpu-1", ready=True))
    kube.put("endpointslices", _slice(f"{NAME}-http", 2))
    kube.put("endpointslices", _slice(f"{NAME}-grpc", 1))


def test_status_of_a_ready_release(cluster):
    kube, kubeconfig, rs = cluster
    _become_ready(kube, rs)
    r = _run(kubeconfig, "status", "--json")
    assert r.exit_code == 0, r.output
    st = json.loads(r.stdout)
    assert st["found"] and st["ready"] and st["app_status"] == "RUNNING"
    assert st["deployments"] == {
        "prefill-llama-3.1-8b-instruct": "HEALTHY", "decode-llama-3.1-8b-instruct": "HEALTHY",
        "router": "HEALTHY",
    }  # fmt: skip
    groups = {p["name"]: (p["group"], p["gpus"], p["ready"]) for p in st["pods"]}
    assert groups == {"rel-head-0": ("head", 0, True), "rel-gpu-1": ("gpu", 2, True)}
    assert st["gpus"] == 2
    assert st["endpoints"] == {f"{NAME}-http": 2, f"{NAME}-grpc": 1}
    assert st["redis"].startswith(f"redis://{NAME}-redis-0.")
    assert "1/1 ready" in st["redis"]
    text = _run(kubeconfig, "status")
    assert text.exit_code == 0
    assert f"RayService {NS}/{NAME}: ready" in text.stdout
    assert "GPUs allocated: 2" in text.stdout
    assert "prefill-llama-3.1-8b-instruct" in text.stdout


def test_status_not_found_and_bad_credentials(cluster, tmp_path):
    _, kubeconfig, _ = cluster
    r = CliRunner().invoke(app, ["k8s", "status", "-n", NS, "--release", "other",
                                 "--kubeconfig", str(kubeconfig)])  # fmt: skip
    assert r.exit_code == 1 and "not found" in r.stdout
    bad = tmp_path / "bad"
    bad.write_text(kubeconfig.read_text().replace("test-token", "wrong"))
    r = CliRunner().invoke(app, ["k8s", "status", "-n", NS, "--release", REL,
                                 "--kubeconfig", str(bad)])  # fmt: skip
    assert r.exit_code == 2 and "401" in r.output
    r = CliRunner().invoke(app, ["k8s", "status", "--kubeconfig", str(tmp_path / "none")])
    assert r.exit_code == 2 and "no Kubernetes configuration" in r.output


def test_wait_times_out_then_succeeds_when_ready(cluster):
    kube, kubeconfig, rs = cluster
    r = _run(kubeconfig, "wait", "--timeout", "0.5")
    assert r.exit_code == 1
    assert "not ready after 0.5 s" in r.output and "waiting for the head pod" in r.output
    timer = threading.Timer(1.0, _become_ready, (kube, rs))
    timer.start()
    try:
        t0 = time.monotonic()
        r = _run(kubeconfig, "wait", "--timeout", "60")
    finally:
        timer.cancel()
    assert r.exit_code == 0, r.output
    assert time.monotonic() - t0 < 60
    assert f"RayService {NS}/{NAME}: ready" in r.stdout
    assert any(p.endswith(f"/rayservices/{NAME}") for p in kube.requests)
