"""The Helm chart, rendered by a real Helm engine: it lints, every example values file renders
objects the Kubernetes schemas and the RayService CRD accept, the app config inside is the one
`splitserve up --config` takes, and values.schema.json refuses bad values naming the field."""

from __future__ import annotations

import json
import subprocess
import sys

import helm_python
import pytest
import yaml

from splitserve.app_config import parse_config
from tests.helm_helpers import CHART, EXAMPLES, ROOT, notes, render, validate


def _examples():
    return [pytest.param(yaml.safe_load(p.read_text()), id=p.stem) for p in EXAMPLES]


def _app_config(docs: list[dict]) -> dict:
    (rs,) = [d for d in docs if d["kind"] == "RayService"]
    serve = yaml.safe_load(rs["spec"]["serveConfigV2"])
    (app,) = serve["applications"]
    assert app["import_path"] == "splitserve.serve_entry:build"
    return app["args"]["config"]


def test_examples_exist():
    assert {p.stem for p in EXAMPLES} >= {
        "values-cpu-demo", "values-gpu-pd", "values-gpu-attention"
    }  # fmt: skip


def test_lint_clean():
    out = helm_python.lint(str(CHART), strict=True)
    assert out["errors"] == [], out
    for values in [None, *(yaml.safe_load(p.read_text()) for p in EXAMPLES)]:
        out = helm_python.lint(str(CHART), values, strict=True)
        assert out["errors"] == [], out


@pytest.mark.parametrize("values", [pytest.param({}, id="defaults"), *_examples()])
def test_renders_valid_objects(values):
    docs = render(values)
    kinds = [d["kind"] for d in docs]
    assert kinds.count("RayService") == 1 and "Service" in kinds, kinds
    podmonitors = [d for d in docs if d["kind"] == "PodMonitor"]
    for d in docs:
        if d["kind"] != "PodMonitor":
            validate(d)
    # The application config is the schema of `splitserve up --config`, exactly.
    cfg = parse_config(_app_config(docs))
    assert cfg.redis and cfg.redis.startswith("redis://")
    assert cfg.metrics.port == 9321 and cfg.http.host == "0.0.0.0"
    assert cfg.router.resources == {"splitserve_router": 1}
    rs = next(d for d in docs if d["kind"] == "RayService")
    rc = rs["spec"]["rayClusterConfig"]
    head = rc["headGroupSpec"]
    assert "splitserve_router" in head["rayStartParams"]["resources"]
    pods = [head["template"], *(g["template"] for g in rc["workerGroupSpecs"])]
    for tpl in pods:
        (c,) = tpl["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports["metrics"] == 9321
        assert {"name": "SPLITSERVE_BIND_HOST", "value": "0.0.0.0"} in c["env"]
    # What the PodMonitor selects is every Ray pod, by its labels and named port.
    for pm in podmonitors:
        sel = pm["spec"]["selector"]["matchLabels"]
        assert pm["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
        for tpl in pods:
            assert sel.items() <= tpl["metadata"]["labels"].items()
    # Services select pods that exist: gRPC the head (where the router runs), HTTP any serving.
    svcs = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    grpc_sel = svcs["rel-splitserve-grpc"]["spec"]["selector"]
    head_labels = {**head["template"]["metadata"]["labels"], "ray.io/serve": "true"}
    assert grpc_sel.items() <= head_labels.items()
    for g in rc["workerGroupSpecs"]:
        labels = {**g["template"]["metadata"]["labels"], "ray.io/serve": "true"}
        assert not grpc_sel.items() <= labels.items()
        assert svcs["rel-splitserve-http"]["spec"]["selector"].items() <= labels.items()


def test_gpu_groups_request_their_gpus():
    values = yaml.safe_load((ROOT / "deploy/helm/examples/values-gpu-pd.yaml").read_text())
    rs = next(d for d in render(values) if d["kind"] == "RayService")
    (g,) = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    (c,) = g["template"]["spec"]["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert g["rayStartParams"]["num-gpus"] == "2"
    assert g["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    cfg = _app_config(render(values))
    assert cfg["models"][0]["prefill"]["num_gpus"] == 1


def test_tenants_secret_and_external_redis():
    digest = "ab" * 32
    docs = render({
        "auth": {"tenants": [{"name": "t", "keys": [digest], "max_concurrent": 2}]},
        "redis": {"enabled": False, "externalUrl": "redis://redis.example:6379/2"},
    })  # fmt: skip
    (secret,) = [d for d in docs if d["kind"] == "Secret"]
    tenants = yaml.safe_load(secret["stringData"]["tenants.yaml"])
    assert tenants == {"tenants": [{"name": "t", "keys": [digest], "max_concurrent": 2}]}
    assert not [d for d in docs if d["kind"] == "StatefulSet"]
    assert _app_config(docs)["redis"] == "redis://redis.example:6379/2"
    assert "create secret" not in notes({"auth": {"tenants": [{"name": "t", "keys": [digest]}]}})
    assert "create secret generic rel-splitserve-tenants" in notes()


BAD = [
    ({"ray": {"workerGroups": [{"name": "g", "accelerator": "gpu", "replicas": 1}]}},
     "at '/ray/workerGroups/0': missing property 'gpus'"),
    ({"ray": {"workerGroups": [{"name": "g", "accelerator": "gpu", "replicas": 1, "gpus": 0}]}},
     "at '/ray/workerGroups/0/gpus': minimum: got 0, want 1"),
    ({"ray": {"workerGroups": [{"name": "g", "accelerator": "cpu", "replicas": -1}]}},
     "at '/ray/workerGroups/0/replicas': minimum: got -1, want 0"),
    ({"app": {"models": [{"name": "m", "path": "p", "prefill": {"replicas": 0}}]}},
     "at '/app/models/0/prefill/replicas': minimum: got 0, want 1"),
    ({"app": {"models": [{"name": "m", "path": "p", "decode": {"replicas": "two"}}]}},
     "at '/app/models/0/decode/replicas': got string, want integer"),
    ({"app": {"models": [{"name": "m", "path": "p", "mode": "fast"}]}},
     "at '/app/models/0/mode'"),
    ({"service": {"httpPort": "8000"}}, "at '/service/httpPort': got string, want integer"),
    ({"ray": {"workerGroups": [{"name": "GPU_1", "accelerator": "cpu", "replicas": 1}]}},
     "at '/ray/workerGroups/0/name'"),
    ({"auth": {"tenants": [{"name": "t", "keys": ["plain-key"]}]}},
     "at '/auth/tenants/0/keys/0'"),
    ({"modelStore": {"type": "s3"}}, "at '/modelStore/type'"),
    ({"replicas": 3}, "additional properties 'replicas' not allowed"),
]  # fmt: skip


@pytest.mark.parametrize(("values", "message"), BAD, ids=[m for _, m in BAD])
def test_schema_rejects_bad_values_naming_the_field(values, message):
    with pytest.raises(helm_python.HelmValuesError) as e:
        render(values)
    assert message in str(e.value)


def test_required_values_fail_with_a_message():
    with pytest.raises(helm_python.HelmError, match=r"modelStore\.claimName"):
        render({"modelStore": {"type": "pvc"}})
    with pytest.raises(helm_python.HelmError, match=r"redis\.externalUrl"):
        render({"redis": {"enabled": False}})


def test_values_schema_is_current():
    """values.schema.json's `app` is AppConfig's schema: regenerated, it is unchanged."""
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts/gen_chart_schema.py"), "--check"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert "ModelSpec" in schema["$defs"]


def _value_paths(d: dict, prefix: str = ""):
    for k, v in d.items():
        path = prefix + k
        # app is the app config (docs/architecture.md); free-form maps are documented whole.
        if isinstance(v, dict) and v and path != "app" and k not in ("requests", "limits"):
            if k == "rayStartParams":
                yield path
                continue
            yield from _value_paths(v, path + ".")
        else:
            yield path


def test_every_values_field_is_documented_in_deploy_md():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    docs = (ROOT / "docs/deploy.md").read_text()
    missing = [p for p in _value_paths(values) if f"`{p}`" not in docs]
    assert not missing, f"values fields missing from docs/deploy.md: {missing}"
