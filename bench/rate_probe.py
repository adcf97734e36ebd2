"""Why the stack falls behind at a rate (issue 19): `splitserve up` colocated
(examples/gpu-llama8b-colocated.yaml) replayed at one fixed rate through the router's HTTP and
through its gRPC `Generate`, one after the other, with every process's CPU sampled from /proc
while each runs, after the low-load overhead check of bench/stack_latency.py. Where a process
sits near a whole core during the HTTP replay and not during the gRPC one, that is the
bottleneck (the router, HAProxy, the load generator itself).

    python bench/rate_probe.py [--rate 8] [--json PATH]
    python bench/rate_probe.py --cpu-smoke --rate 1      # tiny preset on the CPU: plumbing
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import gpu_stack  # noqa: E402
from bench.report import cuda_name, machine, write_report  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_times() -> dict[str, tuple[float, str]]:
    """pid -> (user + system seconds, command line) of every process now."""
    out = {}
    for p in Path("/proc").glob("[0-9]*"):
        try:
            stat = (p / "stat").read_text().rsplit(")", 1)[1].split()
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        out[p.name] = ((int(stat[11]) + int(stat[12])) / TICK, cmd[:100].strip())
    return out


def sample(stop: threading.Event, peaks: dict) -> None:
    """Each second, every process's cores used over that second, appended per process."""
    prev = cpu_times()
    while not stop.wait(1.0):
        now = cpu_times()
        for pid, (t, cmd) in now.items():
            if pid in prev:
                d = t - prev[pid][0]
                s = peaks.setdefault(pid, {"command": cmd, "cores": []})
                s["cores"].append(d)
        prev = now


def replay(target: str, model: str, model_dir: Path, s: dict, rate: float) -> dict:
    cmd = [sys.executable, "-m", "splitserve.cli", "bench", "run",
           *gpu_stack.replay_args(target, model, model_dir, s), "--rate", str(rate),
           "--seed", "1", "--slo-ttft", str(s["ttft_ms"]),
           "--slo-tpot", str(s["tpot_ms"])]  # fmt: skip
    stop, seen = threading.Event(), {}
    watcher = threading.Thread(target=sample, args=(stop, seen))
    watcher.start()
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    stop.set()
    watcher.join()
    busiest = sorted(
        ({"pid": pid, "command": v["command"], "mean_cores": sum(v["cores"]) / len(v["cores"]),
          "peak_cores": max(v["cores"])} for pid, v in seen.items() if v["cores"]),
        key=lambda r: -r["mean_cores"],
    )[:10]  # fmt: skip
    print(p.stdout[-1500:], p.stderr[-500:], sep="\n", flush=True)
    for r in busiest:
        print(f"  {r['mean_cores']:.2f} cores (peak {r['peak_cores']:.2f})  {r['command']}")
    return {"rc": p.returncode, "seconds": time.perf_counter() - t, "report": p.stdout[-1500:],
            "busiest": busiest}  # fmt: skip


def run(rate: float, smoke: bool) -> dict:
    from bench.stack_latency import overhead
    from bench.up_process import config_session, free_port
    from kvstore.registry import list_replicas
    from services.engine.config import ModelConfig
    from splitserve.up import resolve_model_path

    s = gpu_stack.settings(smoke)
    http_port, grpc_port = free_port(), free_port()
    cfg = gpu_stack.app_config("colocated", smoke, http_port, grpc_port)
    spec = gpu_stack.model_spec("colocated", smoke)
    model_dir = resolve_model_path(spec)
    result: dict = {"rate": rate}
    with config_session(cfg, stop_timeout_s=120) as up:
        name, url = spec.name, up.url
        replica = list_replicas(up.redis, "colocated", name)[0].address
        vocab = ModelConfig.from_dir(model_dir).vocab_size
        result["overhead"] = overhead(url, grpc_port, replica, name, vocab, s)
        print("overhead:", json.dumps(result["overhead"]), flush=True)
        for api, target in (("http", f"{url}/v1"), ("grpc", f"grpc://127.0.0.1:{grpc_port}")):
            print(f"== {api} at {rate} req/s", flush=True)
            result[api] = replay(target, name, model_dir, s, rate)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=8.0)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--cpu-smoke", action="store_true")
    a = ap.parse_args(argv)
    if a.rate <= 0:
        ap.error("--rate must be > 0")
    gpu = "cpu smoke" if a.cpu_smoke else cuda_name()
    result = run(a.rate, a.cpu_smoke)
    summary = {
        "http_added_ms_per_request": result["overhead"]["http"].get("added_ms_per_request"),
        "grpc_added_ms_per_request": result["overhead"]["grpc"].get("added_ms_per_request"),
    }
    write_report(a.json, "rate_probe", argv, [result | {"machine": machine(gpu)}], summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
