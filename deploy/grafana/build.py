"""The Grafana dashboards, built with grafana-foundation-sdk from the panels below, written to
deploy/grafana/dashboards/ and (the same files) deploy/helm/splitserve/dashboards/, which the
chart ships as ConfigMaps. tests/test_dashboards.py checks the files are current, and that every
query names only metrics the services export and returns data from a real Prometheus.

    python deploy/grafana/build.py           # rewrite
    python deploy/grafana/build.py --check   # exit 1 if a file is stale

Queries use Grafana's $__rate_interval and the hidden constants below (SLOs: bucket bounds of
the histograms, as prometheus_client writes them in `le`).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
OUTPUTS = (ROOT / "deploy/grafana/dashboards", ROOT / "deploy/helm/splitserve/dashboards")
RI = "$__rate_interval"
# Hidden constants: the SLOs goodput is measured against. They must be bucket bounds:
# router_response_start_seconds (TTFT) and time_per_output_token_seconds (TPOT).
CONSTANTS = {"ttft_slo": "1.0", "tpot_slo": "0.1"}


@dataclass(frozen=True)
class Panel:
    title: str
    unit: str
    targets: tuple[tuple[str, str], ...]  # (PromQL, legend)
    description: str = ""


def _q(p: float, metric: str, sel: str = "", by: str = "le") -> str:
    return f"histogram_quantile({p}, sum by ({by}) (rate({metric}_bucket{sel}[{RI}])))"


def _quantiles(metric: str, sel: str = "") -> tuple[tuple[str, str], ...]:
    return tuple((_q(p, metric, sel), f"p{round(p * 100)}") for p in (0.5, 0.9, 0.99))


RESP = "splitserve:router_response_start_seconds"
TPOT = "splitserve:time_per_output_token_seconds"
DECODING = '{role=~"decode|colocated"}'

DASHBOARDS: dict[str, tuple[str, list[Panel]]] = {
    "splitserve-overview": ("splitserve / Overview", [
        Panel("Requests / s by HTTP status", "reqps", (
            (f"sum by (status) (rate(splitserve:router_requests_total[{RI}]))", "{{status}}"),)),
        Panel("Error share (HTTP 4xx and 5xx)", "percentunit", ((
            f'(sum(rate(splitserve:router_requests_total{{status=~"4..|5.."}}[{RI}])) or vector(0))'
            f" / sum(rate(splitserve:router_requests_total[{RI}]))", "errors"),)),
        Panel("TTFT (router: arrival to first token)", "s", _quantiles(RESP),
              "Streams: the user's time to first token; non-streamed: the whole answer."),
        Panel("TPOT (decode and colocated replicas)", "s", _quantiles(TPOT, DECODING)),
        Panel("Goodput: share within the SLOs", "percentunit", (
            (f'sum(rate({RESP}_bucket{{le="$ttft_slo"}}[{RI}])) / sum(rate({RESP}_count[{RI}]))',
             "TTFT <= $ttft_slo s"),
            (f'sum(rate({TPOT}_bucket{{role=~"decode|colocated",le="$tpot_slo"}}[{RI}]))'
             f" / sum(rate({TPOT}_count{DECODING}[{RI}]))", "TPOT <= $tpot_slo s"),
        )),
        Panel("Goodput: requests / s within the TTFT SLO", "reqps", (
            (f'sum(rate({RESP}_bucket{{le="$ttft_slo"}}[{RI}]))', "good"),
            (f"sum(rate({RESP}_count[{RI}]))", "all"),
        )),
        Panel("Generated tokens / s", "short", (
            (f"sum by (model) (rate(splitserve:generation_tokens_total[{RI}]))", "{{model}}"),)),
        Panel("Prompt tokens / s entering", "short", ((
            f'sum by (model) (rate(splitserve:prompt_tokens_total{{role!="decode"}}[{RI}]))',
            "{{model}}"),)),
    ]),
    "splitserve-tenants": ("splitserve / Tenants", [
        Panel("Queue depth", "short", (
            ("sum by (tenant) (splitserve:router_tenant_queued)", "{{tenant}}"),)),
        Panel("Running", "short", (
            ("sum by (tenant) (splitserve:router_tenant_running)", "{{tenant}}"),)),
        Panel("Rejections / s (at the tenant's limits: HTTP 429)", "reqps", ((
            f"sum by (tenant) (rate(splitserve:router_tenant_rejected_total[{RI}]))",
            "{{tenant}}"),)),
        Panel("Requests / s", "reqps", ((
            f'sum by (tenant) (rate(splitserve:router_requests_total{{tenant!=""}}[{RI}]))',
            "{{tenant}}"),)),
        Panel("Generated tokens / s", "short", ((
            f"sum by (tenant) (rate(splitserve:generation_tokens_total[{RI}]))", "{{tenant}}"),)),
        Panel("Prompt tokens / s", "short", ((
            f'sum by (tenant) (rate(splitserve:prompt_tokens_total{{role!="decode"}}[{RI}]))',
            "{{tenant}}"),)),
    ]),
    "splitserve-kv": ("splitserve / KV cache and transfer", [
        Panel("Prefix cache hit rate", "percentunit", ((
            f"sum by (model) (rate(splitserve:prompt_tokens_cached_total[{RI}]))"
            f" / sum by (model) (rate(splitserve:prompt_tokens_total[{RI}]))", "{{model}}"),)),
        Panel("KV cache usage", "percentunit", ((
            "sum by (role, model) (splitserve:kv_blocks_used)"
            " / sum by (role, model) (splitserve:kv_blocks_total)", "{{role}} {{model}}"),)),
        Panel("KV transfer bytes / s", "Bps", ((
            f"sum by (direction, model) (rate(splitserve:kv_transfer_bytes_total[{RI}]))",
            "{{direction}} {{model}}"),)),
        Panel("KV transfer time (seconds per second)", "s", ((
            f"sum by (direction, model) (rate(splitserve:kv_transfer_seconds_total[{RI}]))",
            "{{direction}} {{model}}"),)),
        Panel("Prompt blocks recomputed / s", "short", ((
            f"sum by (model) (rate(splitserve:kv_recomputed_blocks_total[{RI}]))", "{{model}}"),)),
        Panel("KV store: bytes by tier (prefill shards)", "bytes", (
            ("sum by (tier) (splitserve:kv_store_used_bytes)", "used {{tier}}"),
            ("sum by (tier) (splitserve:kv_store_capacity_bytes)", "capacity {{tier}}"),
        )),
        Panel("KV store: blocks by tier and pinned", "short", (
            ("sum by (tier) (splitserve:kv_store_blocks)", "{{tier}}"),
            ("sum(splitserve:kv_store_pinned_blocks)", "pinned"),
        )),
        Panel("KV blocks lent and borrowed", "short", (
            ("sum by (role, model) (splitserve:kv_blocks_lent)", "lent by {{role}} {{model}}"),
            ("sum by (role, model) (splitserve:kv_blocks_borrowed)",
             "borrowed by {{role}} {{model}}"),
        )),
    ]),
    "splitserve-replicas": ("splitserve / Replicas", [
        Panel("Replicas reporting", "short", (
            ("count by (role, model) (splitserve:num_requests_running)", "{{role}} {{model}}"),)),
        Panel("Requests running", "short", (
            ("sum by (role, model) (splitserve:num_requests_running)", "{{role}} {{model}}"),)),
        Panel("Requests waiting", "short", (
            ("sum by (role, model) (splitserve:num_requests_waiting)", "{{role}} {{model}}"),)),
        Panel("Preemptions / s", "short", ((
            f"sum by (role, model) (rate(splitserve:num_preemptions_total[{RI}]))",
            "{{role}} {{model}}"),)),
        Panel("Engine steps / s by replica", "short", ((
            f"sum by (replica) (rate(splitserve:engine_steps_total[{RI}]))", "{{replica}}"),)),
        Panel("Engine step time by replica", "s", ((
            f"sum by (replica) (rate(splitserve:engine_step_seconds_total[{RI}])) / "
            f"sum by (replica) (rate(splitserve:engine_steps_total[{RI}]))", "{{replica}}"),)),
        Panel("Tokens per engine step by replica", "short", ((
            f"sum by (replica) (rate(splitserve:engine_step_tokens_total[{RI}])) / "
            f"sum by (replica) (rate(splitserve:engine_steps_total[{RI}]))", "{{replica}}"),)),
        Panel("Queue time p99", "s", ((_q(
            0.99, "splitserve:request_queue_time_seconds", "", "le, role"), "{{role}}"),)),
        Panel("Requests ended / s by status", "reqps", ((
            f"sum by (role, status) (rate(splitserve:requests_total[{RI}]))",
            "{{role}} {{status}}"),)),
    ]),
}  # fmt: skip


def build(uid: str, title: str, panels: list[Panel]) -> dict:
    from grafana_foundation_sdk.builders import dashboard, prometheus, timeseries
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import DataSourceRef, GridPos

    ds = DataSourceRef(type_val="prometheus", uid="${datasource}")
    d = (
        dashboard.Dashboard(title)
        .uid(uid)
        .tags(["splitserve"])
        .refresh("30s")
        .time("now-1h", "now")
        .with_variable(
            dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus")
        )
    )
    for name, value in CONSTANTS.items():
        d = d.with_variable(dashboard.ConstantVariable(name).value(value))
    for i, p in enumerate(panels):
        panel = (
            timeseries.Panel()
            .title(p.title)
            .unit(p.unit)
            .datasource(ds)
            .grid_pos(GridPos(h=8, w=12, x=12 * (i % 2), y=8 * (i // 2)))
        )
        if p.description:
            panel = panel.description(p.description)
        for ref, (expr, legend) in zip("ABCDEFGH", p.targets, strict=False):
            panel = panel.with_target(
                prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref).datasource(ds)
            )
        d = d.with_panel(panel)
    out = json.loads(json.dumps(d.build(), cls=JSONEncoder))
    for i, panel in enumerate(out["panels"], start=1):
        panel["id"] = i  # Grafana keys panel links and edits by id
    return out


def render_all() -> dict[str, str]:
    return {
        f"{uid}.json": json.dumps(build(uid, title, panels), indent=2) + "\n"
        for uid, (title, panels) in DASHBOARDS.items()
    }


if __name__ == "__main__":
    files = render_all()
    stale = []
    for out in OUTPUTS:
        for name, text in files.items():
            path = out / name
            if "--check" in sys.argv:
                if not path.exists() or path.read_text() != text:
                    stale.append(str(path))
            else:
                out.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
        extra = {p.name for p in out.glob("*.json")} - set(files) if out.exists() else set()
        stale += [str(out / n) for n in sorted(extra)]
    if stale:
        sys.exit("stale dashboards (run python deploy/grafana/build.py): " + ", ".join(stale))
