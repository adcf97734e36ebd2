"""Write deploy/helm/splitserve/values.schema.json: the chart's own fields, plus `app` as the
JSON schema of splitserve.app_config.AppConfig (the schema `splitserve up --config` checks), so
the chart and the CLI take one config schema. tests/test_helm_chart.py fails when it is stale.

    python scripts/gen_chart_schema.py          # rewrite
    python scripts/gen_chart_schema.py --check  # exit 1 if stale
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SCHEMA = ROOT / "deploy/helm/splitserve/values.schema.json"
DNS_LABEL = "^[a-z0-9]([-a-z0-9]{0,30}[a-z0-9])?$"


def _obj(props: dict, required: tuple[str, ...] = (), extra: bool = False, **kw) -> dict:
    out = {"type": "object", "properties": props, "additionalProperties": extra, **kw}
    if required:
        out["required"] = list(required)
    return out


KEY_DIGEST = "SHA-256 hex digest of an API key: printf %s KEY | sha256sum"
STR = {"type": "string"}
BOOL = {"type": "boolean"}
MAP = {"type": "object"}
LIST = {"type": "array"}
RESOURCES = _obj(
    {"requests": MAP, "limits": MAP, "claims": LIST},
    description="Kubernetes ResourceRequirements.",
)
PLACEMENT = {
    "nodeSelector": {"type": "object", "additionalProperties": STR},
    "tolerations": LIST,
    "affinity": MAP,
}
PULL_POLICY = {"enum": ["Always", "IfNotPresent", "Never"]}
QUANTITY = {"type": "string", "pattern": "^[0-9]+(\\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T)?$"}

WORKER_GROUP = _obj(
    {
        "name": {
            "type": "string",
            "pattern": DNS_LABEL,
            "description": "Lower-case letters, digits and '-' (a DNS label)",
        },
        "accelerator": {"enum": ["cpu", "gpu"]},
        "replicas": {"type": "integer", "minimum": 0},
        "minReplicas": {"type": "integer", "minimum": 0},
        "maxReplicas": {"type": "integer", "minimum": 0},
        "gpus": {"type": "integer", "minimum": 0},
        "gpuResource": {"type": "string", "minLength": 1},
        "rayStartParams": {
            "type": "object",
            "additionalProperties": {"type": ["string", "number", "boolean"]},
        },
        "resources": RESOURCES,
        **PLACEMENT,
        "podLabels": MAP,
        "podAnnotations": MAP,
        "shmSize": QUANTITY,
    },
    required=("name", "accelerator", "replicas"),
    # A GPU group must say how many GPUs each pod gets (at least one).
    allOf=[
        {
            "if": {"properties": {"accelerator": {"const": "gpu"}}, "required": ["accelerator"]},
            "then": {"required": ["gpus"], "properties": {"gpus": {"minimum": 1}}},
        }
    ],
)


def chart_schema() -> dict:
    from splitserve.app_config import AppConfig

    app = AppConfig.model_json_schema(ref_template="#/$defs/{model}")
    defs = app.pop("$defs")
    app.pop("title", None)
    app["description"] = (
        "The application config: the schema of `splitserve up --config` "
        "(splitserve/app_config.py). The chart sets redis, http, grpc, auth and metrics."
    )
    props = {
        "image": _obj(
            {
                "repository": {"type": "string", "minLength": 1},
                "tag": {"type": "string", "minLength": 1},
                "pullPolicy": PULL_POLICY,
            },
            required=("repository", "tag"),
        ),
        "imagePullSecrets": {"type": "array", "items": STR},
        "app": app,
        "auth": _obj(
            {
                "enabled": BOOL,
                "existingSecret": STR,
                "tenants": {
                    "type": "array",
                    "items": _obj(
                        {
                            "name": {"type": "string", "minLength": 1},
                            "keys": {
                                "type": "array",
                                "minItems": 1,
                                "items": {
                                    "type": "string",
                                    "pattern": "^[0-9a-fA-F]{64}$",
                                    "description": KEY_DIGEST,
                                },
                            },
                            "max_concurrent": {"type": "integer", "minimum": 1},
                            "max_queued": {"type": "integer", "minimum": 0},
                            "cache_scope": {"type": "string", "minLength": 1, "maxLength": 128},
                        },
                        required=("name", "keys"),
                    ),
                },
            }
        ),
        "modelStore": _obj(
            {
                "type": {"enum": ["none", "pvc", "hostPath", "pull"]},
                "mountPath": {"type": "string", "pattern": "^/"},
                "claimName": STR,
                "hostPath": STR,
                "pull": {"type": "array", "items": STR},
                "sizeLimit": QUANTITY,
            },
            required=("type", "mountPath"),
        ),
        "ray": _obj(
            {
                "version": {"type": "string", "pattern": "^[0-9]+\\.[0-9]+\\.[0-9]+$"},
                "serviceUnhealthySecondThreshold": {"type": "integer", "minimum": 1},
                "deploymentUnhealthySecondThreshold": {"type": "integer", "minimum": 1},
                "env": LIST,
                "head": _obj(
                    {
                        "rayStartParams": {"type": "object"},
                        "resources": RESOURCES,
                        **PLACEMENT,
                        "podLabels": MAP,
                        "podAnnotations": MAP,
                    }
                ),
                "workerGroups": {"type": "array", "minItems": 1, "items": WORKER_GROUP},
            },
            required=("version", "head", "workerGroups"),
        ),
        "redis": _obj(
            {
                "enabled": BOOL,
                "externalUrl": {"type": "string", "pattern": "^(|rediss?://.+)$"},
                "image": _obj({"repository": STR, "tag": STR, "pullPolicy": PULL_POLICY}),
                "resources": RESOURCES,
                "persistence": _obj({"enabled": BOOL, "size": QUANTITY, "storageClass": STR}),
                **PLACEMENT,
            }
        ),
        "service": _obj(
            {
                "type": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                "httpPort": {"type": "integer", "minimum": 1, "maximum": 65535},
                "grpcPort": {"type": "integer", "minimum": 1, "maximum": 65535},
                "annotations": MAP,
            }
        ),
        "podDisruptionBudget": _obj(
            {"enabled": BOOL, "maxUnavailable": {"type": "integer", "minimum": 0}}
        ),
        "networkPolicy": _obj({"enabled": BOOL, "allowFrom": LIST, "metricsFrom": LIST}),
        "monitoring": _obj(
            {
                "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                "scrapeAnnotations": BOOL,
                "podMonitor": _obj(
                    {
                        "enabled": BOOL,
                        "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                        "labels": MAP,
                    }
                ),
                "dashboards": _obj(
                    {
                        "enabled": BOOL,
                        "label": {"type": "string", "minLength": 1},
                        "labelValue": STR,
                        "namespace": STR,
                        "annotations": MAP,
                    }
                ),
            }
        ),
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "splitserve Helm chart values",
        "type": "object",
        "properties": props,
        "additionalProperties": False,
        "required": ["image", "app", "ray"],
        "$defs": defs,
    }


def render() -> str:
    return json.dumps(chart_schema(), indent=2, sort_keys=False) + "\n"


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv:
        if SCHEMA.read_text() != text:
            sys.exit(f"{SCHEMA} is stale: run python scripts/gen_chart_schema.py")
    else:
        SCHEMA.write_text(text)
        print(SCHEMA)
