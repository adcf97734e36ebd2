"""Rendering the Helm chart with a real Helm engine (helm-python-sdk embeds Helm v4) and
checking what it renders: Kubernetes schemas (kubernetes-validate) and the RayService CRD."""

from __future__ import annotations

import functools
import gzip
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy/helm/splitserve"
EXAMPLES = sorted((ROOT / "deploy/helm/examples").glob("values-*.yaml"))
RAYSERVICE_CRD = Path(__file__).parent / "data/kuberay/ray.io_rayservices.yaml.gz"
KUBE_VERSION = "1.33.0"


def render(values: dict | None = None, name: str = "rel", namespace: str = "llm") -> list[dict]:
    """Every object the chart renders for `values` (over values.yaml), NOTES.txt left out."""
    import helm_python

    chart = helm_python.Chart.load(str(CHART))
    try:
        out = chart.render(values or {}, name=name, namespace=namespace, is_install=True)
    finally:
        chart.close()
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def notes(values: dict | None = None) -> str:
    import helm_python

    chart = helm_python.Chart.load(str(CHART))
    try:
        out = chart.render(values or {}, name="rel", namespace="llm", is_install=True)
    finally:
        chart.close()
    return next(t for p, t in out.items() if p.endswith("NOTES.txt"))


@functools.cache
def rayservice_validator():
    import jsonschema

    crd = yaml.safe_load(gzip.decompress(RAYSERVICE_CRD.read_bytes()))
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = v1["schema"]["openAPIV3Schema"]
    return jsonschema.Draft7Validator(schema)


def validate(obj: dict) -> None:
    """Raise on an object the API server would refuse (its schema) and on any field the schema
    does not know (strict)."""
    if obj["kind"] == "RayService":
        errors = sorted(rayservice_validator().iter_errors(obj), key=lambda e: list(e.path))
        if errors:
            raise AssertionError(
                "RayService: "
                + "; ".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors[:5])
            )
        # The pod templates inside are core objects: checked as such.
        rc = obj["spec"]["rayClusterConfig"]
        for tpl in [rc["headGroupSpec"]["template"]] + [
            g["template"] for g in rc["workerGroupSpecs"]
        ]:
            _kube({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                   "template": tpl})  # fmt: skip
        return
    _kube(obj)


def _kube(obj: dict) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
