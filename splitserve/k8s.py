"""What an operator asks of a splitserve release on Kubernetes (the Helm chart's objects), read
with the kubernetes client: the RayService's status, the Ray pods by group with their GPUs, the
Serve deployments by role, the Services' endpoints and the Redis server. `wait_ready` polls
until the RayService serves (or a timeout)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import yaml

GPU_SUFFIX = "gpu"  # nvidia.com/gpu, amd.com/gpu, ...


@dataclass
class PodInfo:
    name: str
    group: str
    phase: str
    ready: bool
    gpus: int
    node: str


@dataclass
class Status:
    name: str
    namespace: str
    found: bool
    service_status: str = ""
    ready: bool = False
    message: str = ""
    app_status: str = ""
    deployments: dict[str, str] = field(default_factory=dict)  # role-model: HEALTHY, ...
    pods: list[PodInfo] = field(default_factory=list)
    endpoints: dict[str, int] = field(default_factory=dict)  # Service: ready addresses
    redis: str = ""

    @property
    def gpus(self) -> int:
        return sum(p.gpus for p in self.pods)

    def as_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {**asdict(self), "gpus": self.gpus}


def fullname(release: str, chart: str = "splitserve") -> str:
    """The chart's name for a release's objects (templates/_helpers.tpl)."""
    name = release if chart in release else f"{release}-{chart}"
    return name[:40].rstrip("-")


def api_client(kubeconfig: str | None = None, context: str | None = None):
    """A client from a kubeconfig (default: $KUBECONFIG or ~/.kube/config), or in-cluster."""
    from kubernetes import client, config

    try:
        return config.new_client_from_config(config_file=kubeconfig, context=context)
    except config.ConfigException:
        if kubeconfig or context:
            raise
        config.load_incluster_config()
        return client.ApiClient()


def _ready_condition(st: dict) -> tuple[bool, str]:
    for c in st.get("conditions") or []:
        if c.get("type") == "Ready":
            return c.get("status") == "True", c.get("message") or c.get("reason") or ""
    # Older KubeRay: no conditions, serviceStatus "Running" when the application serves.
    return st.get("serviceStatus") == "Running", ""


def status(api, namespace: str, release: str, name: str | None = None) -> Status:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    name = name or fullname(release)
    out = Status(name=name, namespace=namespace, found=False)
    try:
        rs = client.CustomObjectsApi(api).get_namespaced_custom_object(
            "ray.io", "v1", namespace, "rayservices", name
        )
    except ApiException as e:
        if e.status != 404:
            raise
        return out
    out.found = True
    st = rs.get("status") or {}
    out.service_status = st.get("serviceStatus") or ""
    out.ready, out.message = _ready_condition(st)
    active = st.get("activeServiceStatus") or {}
    app = (active.get("applicationStatuses") or {}).get("splitserve") or {}
    out.app_status = app.get("status") or ""
    out.deployments = {
        d: (s or {}).get("status", "")
        for d, s in (app.get("serveDeploymentStatuses") or {}).items()
    }
    try:
        config = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["args"]["config"]
        out.redis = config.get("redis") or ""
    except (KeyError, IndexError, TypeError, yaml.YAMLError):
        out.redis = ""
    core = client.CoreV1Api(api)
    pods = core.list_namespaced_pod(
        namespace,
        label_selector=f"app.kubernetes.io/instance={release},app.kubernetes.io/component=ray",
    )
    for p in pods.items:
        labels = p.metadata.labels or {}
        gpus = 0
        for c in p.spec.containers:
            for k, v in ((c.resources and c.resources.limits) or {}).items():
                if k.endswith(GPU_SUFFIX):
                    gpus += int(v)
        ready = any(c.type == "Ready" and c.status == "True" for c in (p.status.conditions or []))
        group = labels.get("splitserve.io/group", "?")
        node = p.spec.node_name or ""
        out.pods.append(PodInfo(p.metadata.name, group, p.status.phase or "", ready, gpus, node))
    disc = client.DiscoveryV1Api(api)
    for svc in (f"{name}-http", f"{name}-grpc"):
        slices = disc.list_namespaced_endpoint_slice(
            namespace, label_selector=f"kubernetes.io/service-name={svc}"
        )
        out.endpoints[svc] = sum(
            1
            for s in slices.items
            for e in s.endpoints or []
            if e.conditions is None or e.conditions.ready is not False
        )
    if out.redis.startswith(f"redis://{name}-redis-0."):
        try:
            sts = client.AppsV1Api(api).read_namespaced_stateful_set(f"{name}-redis", namespace)
            ready = (sts.status and sts.status.ready_replicas) or 0
            out.redis += f" (StatefulSet {name}-redis: {ready}/{sts.spec.replicas} ready)"
        except ApiException as e:
            if e.status != 404:
                raise
            out.redis += f" (StatefulSet {name}-redis: missing)"
    return out


def wait_ready(
    api, namespace: str, release: str, timeout_s: float, name: str | None = None,
    poll_s: float = 2.0, on_poll=None,
) -> Status:  # fmt: skip
    """Poll until the RayService is ready and its HTTP Service has an endpoint; returns the
    last status (check .ready: False when timeout_s passed first)."""
    deadline = time.monotonic() + timeout_s
    while True:
        st = status(api, namespace, release, name)
        if on_poll is not None:
            on_poll(st)
        if st.found and st.ready and st.endpoints.get(f"{st.name}-http", 0) > 0:
            return st
        left = deadline - time.monotonic()
        if left <= 0:
            return st
        time.sleep(min(poll_s, left))
