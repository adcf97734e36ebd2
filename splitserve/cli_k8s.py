"""`splitserve k8s`: a Helm release of splitserve as an operator sees it (splitserve.k8s)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from splitserve.cli_common import fail

k8s_app = typer.Typer(help="A splitserve release on Kubernetes.", no_args_is_help=True)

Namespace = Annotated[str, typer.Option("--namespace", "-n", help="The release's namespace")]
Release = Annotated[str, typer.Option("--release", help="The Helm release name")]
Name = Annotated[
    str | None, typer.Option("--name", help="The RayService (default: the chart's name)")
]
Kubeconfig = Annotated[
    str | None, typer.Option("--kubeconfig", help="Default: $KUBECONFIG, ~/.kube/config")
]
Context = Annotated[str | None, typer.Option("--context", help="kubeconfig context")]
AsJson = Annotated[bool, typer.Option("--json", help="One JSON object")]


def _api(kubeconfig: str | None, context: str | None):
    from kubernetes.config import ConfigException

    from splitserve.k8s import api_client

    try:
        return api_client(kubeconfig, context)
    except (ConfigException, OSError) as e:
        fail(f"no Kubernetes configuration: {e}")


def _print(st, as_json: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    if as_json:
        print(json.dumps(st.as_dict()))
        return
    out = Console(soft_wrap=True)
    if not st.found:
        out.print(f"RayService {st.namespace}/{st.name}: not found", highlight=False)
        return
    state = "ready" if st.ready else "not ready"
    out.print(
        f"RayService {st.namespace}/{st.name}: {state} (service {st.service_status or '-'}, "
        f"application {st.app_status or '-'}){': ' + st.message if st.message else ''}",
        highlight=False,
    )
    t = Table("deployment (role-model)", "status", title="Serve deployments")
    for d, s in sorted(st.deployments.items()):
        t.add_row(d, s)
    out.print(t)
    t = Table("pod", "group", "phase", "ready", "GPUs", "node", title="Ray pods")
    for p in sorted(st.pods, key=lambda p: (p.group != "head", p.group, p.name)):
        t.add_row(p.name, p.group, p.phase, "yes" if p.ready else "no", str(p.gpus), p.node)
    out.print(t)
    out.print(f"GPUs allocated: {st.gpus}", highlight=False)
    for svc, n in st.endpoints.items():
        out.print(f"Service {svc}: {n} ready endpoint(s)", highlight=False)
    out.print(f"Redis: {st.redis or '-'}", highlight=False)


def _k8s_errors(fn):
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        return fn()
    except ApiException as e:
        fail(f"Kubernetes API: {e.status} {e.reason}")
    except HTTPError as e:
        fail(f"Kubernetes API unreachable: {e}")


@k8s_app.command("status")
def status_cmd(
    release: Release = "splitserve",
    namespace: Namespace = "default",
    name: Name = None,
    kubeconfig: Kubeconfig = None,
    context: Context = None,
    as_json: AsJson = False,
) -> None:
    """The RayService's status, Serve deployments by role, Ray pods and their GPUs, the
    Services' endpoints and the Redis server. Exit 1 when the RayService is not found."""
    from splitserve.k8s import status

    api = _api(kubeconfig, context)
    st = _k8s_errors(lambda: status(api, namespace, release, name))
    _print(st, as_json)
    if not st.found:
        raise typer.Exit(1)


@k8s_app.command("wait")
def wait_cmd(
    release: Release = "splitserve",
    namespace: Namespace = "default",
    name: Name = None,
    timeout: Annotated[float, typer.Option("--timeout", min=0, help="Seconds")] = 1800,
    kubeconfig: Kubeconfig = None,
    context: Context = None,
    as_json: AsJson = False,
) -> None:
    """Wait until the RayService is ready and its HTTP Service has an endpoint. Exit 0 when it
    is, 1 (with the last status) when --timeout passes first."""
    from rich.console import Console

    from splitserve.k8s import wait_ready

    api = _api(kubeconfig, context)
    err = Console(stderr=True, soft_wrap=True)
    seen: list[str] = []

    def progress(st) -> None:
        line = f"{st.service_status or '-'} / {st.app_status or '-'}" if st.found else "not found"
        if not seen or seen[-1] != line:
            seen.append(line)
            err.print(f"RayService {st.name}: {line}", highlight=False)

    st = _k8s_errors(lambda: wait_ready(api, namespace, release, timeout, name, on_poll=progress))
    if not st.ready or not st.found:
        _print(st, as_json)
        fail(f"RayService {namespace}/{st.name} not ready after {timeout:g} s", code=1)
    _print(st, as_json)
