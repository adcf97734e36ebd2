"""bench/gpu_stack.py's pure parts: the configs it brings up (the examples; the smoke's CPU
variant keeps their shape without GPU fields), and its summary's ratios (null where a part is
missing or failed). Nothing here starts a server."""

from __future__ import annotations

from bench.gpu_stack import app_config, summarize_parts
from splitserve.app_config import parse_config


def test_the_examples_on_free_ports_and_their_cpu_smoke_variant():
    for mode in ("colocated", "disaggregated"):
        gpu = parse_config(app_config(mode, False, 18000, 15051))
        [m] = gpu.models
        assert (gpu.http.port, gpu.grpc.port, gpu.metrics.port) == (18000, 15051, 0)
        assert (m.path, m.mode, m.engine.load_format) == ("llama-8b", mode, "dummy")
        assert all(m.side(r).num_gpus > 0 for r in m.serving_roles)
        cpu = parse_config(app_config(mode, True, 18000, 15051))
        [t] = cpu.models
        assert (t.path, t.mode, t.dtype) == ("tiny", mode, "float32")
        assert all(t.side(r).num_gpus == 0 for r in t.serving_roles)
        assert all(t.side(r).gpu_memory_utilization is None for r in t.serving_roles)


def test_summary_ratios_and_missing_parts():
    parts = {
        "engine": {"goodput": {"goodput_rps": 8.0}, "full_queue_prefill": {"tok_s": 30000.0}},
        "colocated": {
            "goodput": {"goodput_rps": 7.6},
            "overhead": {"http": {"added_ms_per_request": 1.5, "added_ms_per_token": 0.1}},
        },
        "disaggregated": {"error": "exit 1"},
    }
    s = summarize_parts(parts)
    assert s["stack_goodput_ratio"] == 7.6 / 8.0
    assert (s["router_overhead_ms_p50"], s["router_overhead_ms_per_token_p50"]) == (1.5, 0.1)
    assert s["disaggregated_goodput_ratio"] is None and s["prefill_server_ratio"] is None
    assert summarize_parts({})["stack_goodput_ratio"] is None
