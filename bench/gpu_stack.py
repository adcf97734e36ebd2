"""The product on one GPU: `splitserve up` under Ray Serve against the bare engine, llama-8b
preset (random bf16 weights), the Azure conversation excerpt, SLO TTFT <= 1 s and TPOT <= 50 ms
for >= 90% of requests.

    python bench/gpu_stack.py [--json PATH] [--out DIR] [--parts engine,colocated,disaggregated]
    python bench/gpu_stack.py --cpu-smoke --json /tmp/s.json   # tiny preset on the CPU: plumbing

Each part runs in its own process (the GPU is free again between them) and fits one device
call; a --json that exists keeps the parts not run now, so parts can run in separate calls.
- engine: the bare engine in this process (services.engine_loop, no gRPC, no router, no Ray)
  fed the trace directly: its goodput, with the same workload, SLO and search as
  `splitserve bench goodput` (examples/gpu-llama8b-colocated.yaml's engine settings); and its
  full-queue prefill rate: a burst of the trace's prompts at once, one token each, under the
  prefill replica's settings (examples/gpu-llama8b.yaml).
- colocated: `splitserve up --config examples/gpu-llama8b-colocated.yaml`: the router's and
  Ray's added latency at low load (the same requests, one at a time, straight to the replica's
  gRPC port, through the router's HTTP and through its gRPC), then `splitserve bench goodput`.
  Prompts are token ids everywhere, so the HTTP client asks for `return_token_ids` and counts
  tokens by id: valid with random weights, whose tokens often decode to no text.
- disaggregated: `splitserve up --config examples/gpu-llama8b.yaml` (prefill and decode sharing
  the GPU): the same burst through the prefill replica and on to decode (its queue, prefill
  and publish times), then `splitserve bench goodput`.
Every goodput search first replays one discarded run at the lowest rate (CUDA graphs for new
batch sizes, allocator growth), for the bare engine and the stack alike.

Summary: stack_goodput_ratio (colocated `up` over the bare engine: the same engine settings),
disaggregated_goodput_ratio, prefill_server_ratio (the prefill replica's burst rate over the
engine's full-queue one), router_overhead_ms_p50 (per request, HTTP) and
router_overhead_ms_per_token_p50.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import cuda_name, machine, write_report  # noqa: E402
from bench.step_stats import loop_counters, step_counters, step_split  # noqa: E402

perf = time.perf_counter
EXAMPLES = {"colocated": ROOT / "examples/gpu-llama8b-colocated.yaml",
            "disaggregated": ROOT / "examples/gpu-llama8b.yaml"}  # fmt: skip
PARTS = ("engine", "colocated", "disaggregated")


# -- settings ---------------------------------------------------------------------------------


# Set from the command line (--overhead-requests, --api) in a part's process.
OVERRIDES: dict = {}
API = {"stack": "grpc"}


def settings(smoke: bool) -> dict:
    """The search and workload, the same for the bare engine and the stack."""
    return _settings(smoke) | OVERRIDES


def _settings(smoke: bool) -> dict:
    if smoke:
        return {"lo": 0.5, "hi": 1.0, "tol": 0.3, "probes": 2, "span_s": 4.0, "requests": 6,
                "warmup_s": 0.0, "max_output": 8, "max_prompt": 200, "burst": 6,
                "seq_requests": 3, "seq_prompt": 32, "seq_tokens": 8, "ttft_ms": 30_000,
                "tpot_ms": 5_000, "timeout_s": 300}  # fmt: skip
    return {"lo": 3.0, "hi": 8.0, "tol": 0.1, "probes": 4, "span_s": 10.0, "requests": 200,
            "warmup_s": 1.5, "max_output": 512, "max_prompt": 8192 - 512 - 8, "burst": 100,
            "seq_requests": 16, "seq_prompt": 512, "seq_tokens": 64, "ttft_ms": 1000,
            "tpot_ms": 50, "timeout_s": 120}  # fmt: skip


def app_config(mode: str, smoke: bool, http_port: int, grpc_port: int) -> dict:
    """The example's config on free ports; for the smoke, the tiny preset on the CPU."""
    cfg = yaml.safe_load(EXAMPLES[mode].read_text())
    cfg["http"] = {"host": "127.0.0.1", "port": http_port}
    cfg["grpc"] = {"host": "127.0.0.1", "port": grpc_port}
    cfg["metrics"] = {"port": 0}
    if smoke:
        m = cfg["models"][0]
        m.update(name="tiny", path="tiny", dtype="float32")
        for role in ("prefill", "decode", "colocated"):
            if role in m:
                gpu = ("num_gpus", "gpu_memory_utilization", "device_pool")
                m[role] = {k: v for k, v in m[role].items() if k not in gpu}
        m["engine"] = {"load_format": "dummy", "max_num_seqs": 16, "max_num_batched_tokens": 256,
                       "kv_cache_memory": "64MiB"}  # fmt: skip
    return cfg


def model_spec(mode: str, smoke: bool):
    from splitserve.app_config import parse_config

    return parse_config(app_config(mode, smoke, 8000, 50051)).models[0]


# -- the bare engine --------------------------------------------------------------------------


class EngineClient:
    """loadgen's Client over an EngineLoop in this process: the engine fed directly."""

    def __init__(self, loop, timeout_s: float) -> None:
        self.loop, self.timeout_s = loop, timeout_s
        self.tasks: set[asyncio.Task] = set()

    async def open(self, connections: int) -> None:
        pass

    def submit(self, p, out, done) -> None:
        task = asyncio.get_running_loop().create_task(self._run(p, out, done))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run(self, p, out, done) -> None:
        from services.engine.sampling_params import SamplingParams

        params = SamplingParams(max_tokens=p.max_tokens, temperature=0.0, ignore_eos=True)
        out.sent = perf()
        try:
            async with asyncio.timeout(self.timeout_s):
                async for o in self.loop.generate(uuid.uuid4().hex, list(p.prompt.ids), params):
                    now = perf()
                    if o.new_token_ids:
                        out.piece(now, len(o.new_token_ids))
                    out.end = now
        except Exception as e:
            out.error = f"{type(e).__name__}: {e}"
        finally:
            done(out)

    async def close(self) -> None:
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def workload(model_dir: Path, s: dict):
    from loadgen.prompts import PromptFactory
    from loadgen.readers import read_trace
    from loadgen.runner import Workload, load_tokenizer
    from loadgen.workload import ReplayConfig

    cfg = ReplayConfig(duration_s=s["span_s"], max_requests=s["requests"],
                       warmup_s=s["warmup_s"], max_prompt_tokens=s["max_prompt"],
                       max_output_tokens=s["max_output"], seed=0)  # fmt: skip
    work = Workload(cfg, trace=read_trace("azure-conv"))
    return work, PromptFactory(load_tokenizer(str(model_dir)), "ids", 0, work.block_tokens)


def burst(model_dir: Path, s: dict, offset: int) -> list:
    """The trace's first prompts (their lengths; fresh ids, so nothing is in a prefix cache),
    all at t=0, one token each."""
    from loadgen.readers import read_trace
    from loadgen.workload import Planned

    _, prompts = workload(model_dir, s)
    reqs = read_trace("azure-conv").requests[: s["burst"]]
    return [
        Planned(
            offset + i,
            0.0,
            prompts.build(offset + i, min(r.prompt_tokens, s["max_prompt"])),
            1,
            "default",
            "",
            False,
        )
        for i, r in enumerate(reqs)
    ]


def prefill_rate(outcomes, t0: float) -> dict:
    ok = [o for o in outcomes if o.ok]
    tokens = sum(o.prompt_tokens for o in ok)
    wall = max(o.first_token for o in ok) - t0 if ok else math.nan
    return {"requests": len(outcomes), "completed": len(ok), "prompt_tokens": tokens,
            "wall_s": wall, "tok_s": tokens / wall if ok else None}  # fmt: skip


async def search_goodput(client, work, prompts, s: dict, label: str) -> dict:
    """Exactly what `splitserve bench goodput --repeats 1` does, after one discarded run."""
    from loadgen.goodput import search
    from loadgen.metrics import SLO, summarize
    from loadgen.replay import replay

    slo = SLO(s["ttft_ms"] / 1e3, s["tpot_ms"] / 1e3, 0.9)
    await replay(work.planned(prompts, s["lo"], 99), client, 32, None, s["timeout_s"] + 30)
    probes = []

    async def measure(rate: float, k: int) -> dict:
        res = await replay(work.planned(prompts, rate, k), client, 32, None, s["timeout_s"] + 30)
        summ = summarize(res.outcomes, slo)
        probes.append({"rate": rate, "attainment": summ["attainment"],
                       "ttft_p90_s": summ["ttft_s"]["p90"], "tpot_p90_s": summ["tpot_s"]["p90"],
                       "errors": summ["errors"]})  # fmt: skip
        print(f"  {label} {rate:.2f} req/s: {summ['attainment']}", flush=True)
        return summ

    res = await search(measure, 0.9, s["lo"], s["hi"], 1, s["tol"], s["probes"])
    return {"goodput_rps": res.goodput_rps, "bracket": list(res.bracket),
            "converged": res.converged, "probes": probes}  # fmt: skip


def part_engine(smoke: bool, out_dir: Path) -> dict:
    import gc

    import torch

    from loadgen.replay import replay
    from services.engine.engine import LLMEngine
    from services.engine_loop import EngineLoop
    from splitserve.up import resolve_model_path

    s = settings(smoke)
    device = "cpu" if smoke else "cuda"
    spec = model_spec("colocated", smoke)
    model_dir = resolve_model_path(spec)
    result: dict = {"part": "engine"}

    def run(role_mode: tuple[str, str], body):
        mode, role = role_mode
        ecfg = model_spec(mode, smoke).engine_config(role, device=device)
        t = perf()
        engine = LLMEngine(model_dir, ecfg)
        print(f"engine ({mode} {role}) built in {perf() - t:.0f} s: {engine.pool.num_blocks} "
              "KV blocks", flush=True)  # fmt: skip
        loop = EngineLoop(engine, max_waiting=1 << 16)
        try:
            return asyncio.run(body(EngineClient(loop, s["timeout_s"])))
        finally:
            loop.stop()
            del engine, loop
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()

    async def full_queue(client) -> dict:
        # A whole burst first (other ids): the first after a start runs cold (kernel plans for
        # new shapes; 2026-12-05 measured both sides cold, at ~1/3 of the warm rate).
        await replay(burst(model_dir, s, 50_000), client, 32, None, s["timeout_s"] + 30)
        planned = burst(model_dir, s, 60_000)
        before = loop_counters(client.loop)
        t0 = perf()
        res = await replay(planned, client, 32, None, s["timeout_s"] + 30)
        return prefill_rate(res.outcomes, t0) | step_split(before, loop_counters(client.loop))

    result["full_queue_prefill"] = run(("disaggregated", "prefill"), full_queue)
    print("engine full-queue prefill:", json.dumps(result["full_queue_prefill"]), flush=True)
    if not s.get("goodput", True):
        return result
    work, prompts = workload(model_dir, s)
    result["goodput"] = run(("colocated", "colocated"),
                            lambda c: search_goodput(c, work, prompts, s, "engine"))  # fmt: skip
    print(f"bare engine goodput: {result['goodput']['goodput_rps']:.2f} req/s", flush=True)
    return result


# -- the stack --------------------------------------------------------------------------------


def replay_args(target: str, model: str, model_dir: Path, s: dict) -> list[str]:
    """`splitserve bench run/goodput` arguments of the workload (settings s) against target:
    an OpenAI base URL (.../v1) or grpc://host:port."""
    return ["--url", target, "--model", model, "--prompt-format", "ids",
            "--tokenizer", str(model_dir), "--trace", "azure-conv",
            "--duration", str(s["span_s"]), "--requests", str(s["requests"]),
            "--warmup", str(s["warmup_s"]), "--max-prompt-tokens", str(s["max_prompt"]),
            "--max-output-tokens", str(s["max_output"]), "--timeout", str(s["timeout_s"]),
            "--extra", '{"temperature": 0}', "--quiet"]  # fmt: skip


def stack_goodput(url: str, model: str, model_dir: Path, s: dict, out_dir: Path) -> dict:
    """url: the router's HTTP base (http://...) or its gRPC Generate (grpc://...)."""
    """`splitserve bench run` once at the lowest rate (discarded), then `splitserve bench
    goodput` with the bare engine's workload and search; its report and plots in out_dir."""
    target = url if url.startswith("grpc://") else f"{url}/v1"
    common = replay_args(target, model, model_dir, s)
    cli = [sys.executable, "-m", "splitserve.cli", "bench"]
    warm = [*cli, "run", *common, "--rate", str(s["lo"]), "--seed", "99"]
    subprocess.run(warm, check=True, capture_output=True, text=True)
    cmd = [*cli, "goodput", *common, "--slo-ttft", str(s["ttft_ms"]), "--slo-tpot",
           str(s["tpot_ms"]), "--low", str(s["lo"]), "--high", str(s["hi"]), "--repeats", "1",
           "--tolerance", str(s["tol"]), "--max-probes", str(s["probes"]),
           "--out", str(out_dir)]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True)
    print(p.stdout[-3000:], p.stderr[-2000:], sep="\n", flush=True)
    if p.returncode != 0:
        raise RuntimeError(f"splitserve bench goodput exited {p.returncode}")
    rep = json.loads((out_dir / "report.json").read_text())
    return {"goodput_rps": rep["goodput_rps"], "bracket": rep["bracket"],
            "converged": rep["converged"],
            "probes": [{"rate": p["rate"], "attainment": p["attainment"]}
                       for p in rep["probes"]]}  # fmt: skip


async def pd_burst(pre: str, dec: str, planned: list, metrics: str = "") -> dict:
    """The burst through the prefill replica and on to decode (which pulls the KV, as in
    service): the prefill replica's rate, where its requests' time went and (with the
    replica's metrics address) its steps during the timed half."""
    import numpy as np

    from bench.goodput_2gpu import PDReplayClient
    from loadgen.replay import replay

    client = PDReplayClient("disaggregated", (pre, dec), 2)
    # Two tokens: the first from prefill, the second after decode has pulled the KV.
    planned = [dataclasses.replace(p, max_tokens=2) for p in planned]
    half = len(planned) // 2  # the first half warms (see part_engine)
    await replay(planned[:half], client, 32, None, 300)
    client.timings.clear()
    before = await asyncio.to_thread(step_counters, metrics)
    t0 = perf()
    res = await replay(planned[half:], client, 32, None, 300)
    out = prefill_rate(res.outcomes, t0)
    out.update(step_split(before, await asyncio.to_thread(step_counters, metrics)))
    for key in ("queue_ms", "prefill_ms", "publish_ms", "transfer_ms"):
        v = [t[key] for t in client.timings.values() if key in t]
        out[f"{key}_mean"] = float(np.mean(v)) if v else None
    await client.shutdown()
    return out


def part_stack(mode: str, smoke: bool, out_dir: Path) -> dict:
    from bench.up_process import config_session, free_port
    from kvstore.registry import list_replicas
    from services.engine.config import ModelConfig
    from splitserve.up import resolve_model_path

    s = settings(smoke)
    http_port, grpc_port = free_port(), free_port()
    cfg = app_config(mode, smoke, http_port, grpc_port)
    spec = model_spec(mode, smoke)
    model_dir = resolve_model_path(spec)
    result: dict = {"part": mode, "config": cfg}
    t = perf()
    with config_session(cfg, stop_timeout_s=120) as up:
        result["up_s"] = perf() - t
        print(f"splitserve up ({mode}) at {up.url} in {result['up_s']:.0f} s", flush=True)
        roles = spec.serving_roles
        reps = {r: list_replicas(up.redis, r, spec.name) for r in roles}
        result["replicas"] = {r: [x.address for x in v] for r, v in reps.items()}
        if mode == "colocated":
            from bench.stack_latency import openai_check, overhead

            result["openai"] = openai_check(up.url, spec.name, s["timeout_s"])
            print("openai client:", json.dumps(result["openai"]), flush=True)
            vocab = ModelConfig.from_dir(model_dir).vocab_size
            result["overhead"] = overhead(up.url, grpc_port, reps["colocated"][0].address,
                                          spec.name, vocab, s)  # fmt: skip
            print("overhead:", json.dumps(result["overhead"]), flush=True)
        else:
            planned = burst(model_dir, s, 70_000) + burst(model_dir, s, 80_000)
            pre = reps["prefill"][0]
            result["prefill_burst"] = asyncio.run(
                pd_burst(pre.address, reps["decode"][0].address, planned, pre.metrics_address)
            )
            print("prefill burst:", json.dumps(result["prefill_burst"]), flush=True)
        # Either API times every token: random weights' tokens often have no text of their
        # own, and the replay's token-id prompts make the HTTP client ask for
        # `return_token_ids`, so each SSE chunk names its tokens as gRPC's messages do.
        api = f"grpc://127.0.0.1:{grpc_port}" if API["stack"] == "grpc" else up.url
        result["api"] = API["stack"]
        if s.get("goodput", True):
            result["goodput"] = stack_goodput(api, spec.name, model_dir, s, out_dir / mode)
            rps = result["goodput"]["goodput_rps"]
            print(f"{mode} up goodput: {rps:.2f} req/s", flush=True)
    result["up_log_tail"] = "".join(up.stderr)[-3000:]
    return result


# -- main -------------------------------------------------------------------------------------


def summarize_parts(parts: dict) -> dict:
    def get(part, *keys):
        v = parts.get(part)
        for k in keys:
            v = v.get(k) if isinstance(v, dict) else None
        return v

    def ratio(a, b):
        return a / b if a is not None and b else None

    bare = get("engine", "goodput", "goodput_rps")
    http = get("colocated", "overhead", "http") or {}
    grpc = get("colocated", "overhead", "grpc") or {}
    return {
        "bare_engine_goodput_rps": bare,
        "colocated_up_goodput_rps": get("colocated", "goodput", "goodput_rps"),
        "disaggregated_up_goodput_rps": get("disaggregated", "goodput", "goodput_rps"),
        "stack_goodput_ratio": ratio(get("colocated", "goodput", "goodput_rps"), bare),
        "disaggregated_goodput_ratio": ratio(get("disaggregated", "goodput", "goodput_rps"), bare),
        "engine_full_queue_prefill_tok_s": get("engine", "full_queue_prefill", "tok_s"),
        "prefill_server_tok_s": get("disaggregated", "prefill_burst", "tok_s"),
        "prefill_server_ratio": ratio(
            get("disaggregated", "prefill_burst", "tok_s"),
            get("engine", "full_queue_prefill", "tok_s"),
        ),
        "router_overhead_ms_p50": http.get("added_ms_per_request"),
        "router_overhead_ms_per_token_p50": http.get("added_ms_per_token"),
        "grpc_overhead_ms_p50": grpc.get("added_ms_per_request"),
        "grpc_overhead_ms_per_token_p50": grpc.get("added_ms_per_token"),
        "goals": {
            "stack_goodput_ratio": ">= 0.9",
            "prefill_server_ratio": ">= 0.85",
            "router_overhead_ms_p50": "<= 2",
            "router_overhead_ms_per_token_p50": "<= 0.2",
        },
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="`splitserve bench` reports + plots")
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--cpu-smoke", action="store_true")
    ap.add_argument("--overhead-requests", type=int, help="requests per path at low load")
    ap.add_argument("--overhead-prompt", type=int,
                    help="their prompt's tokens (512 on a GPU, 32 in the smoke)")  # fmt: skip
    ap.add_argument("--api", choices=("grpc", "http"), default="grpc",
                    help="the router API the stack's goodput is replayed through")  # fmt: skip
    ap.add_argument("--part-timeout-s", type=float, default=590)
    ap.add_argument("--skip-goodput", action="store_true",
                    help="the burst, overhead and client checks only (no goodput)")  # fmt: skip
    ap.add_argument("--run-part", choices=PARTS, help=argparse.SUPPRESS)
    ap.add_argument("--part-json", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    out_dir = a.out or Path(tempfile.mkdtemp(prefix="gpu-stack-"))
    if a.overhead_requests:
        OVERRIDES["seq_requests"] = a.overhead_requests
    if a.overhead_prompt:
        OVERRIDES["seq_prompt"] = a.overhead_prompt
    API["stack"] = a.api
    OVERRIDES["goodput"] = not a.skip_goodput
    if a.run_part:
        fn = part_engine if a.run_part == "engine" else lambda sm, o: part_stack(a.run_part, sm, o)
        a.part_json.write_text(json.dumps(fn(a.cpu_smoke, out_dir), default=str))
        return 0
    gpu = "cpu smoke" if a.cpu_smoke else cuda_name()
    old = json.loads(a.json.read_text()) if a.json and a.json.exists() else {}
    parts = {r["part"]: r for r in old.get("results", []) if "part" in r}
    for name in a.parts.split(","):
        if name not in PARTS:
            raise SystemExit(f"--parts: unknown part {name!r} (choose from {', '.join(PARTS)})")
        t = perf()
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            cmd = [sys.executable, __file__, "--run-part", name, "--part-json", f.name,
                   "--out", str(out_dir)] + (["--cpu-smoke"] if a.cpu_smoke else [])  # fmt: skip
            if a.overhead_requests:
                cmd += ["--overhead-requests", str(a.overhead_requests)]
            if a.overhead_prompt:
                cmd += ["--overhead-prompt", str(a.overhead_prompt)]
            cmd += ["--api", a.api] + (["--skip-goodput"] if a.skip_goodput else [])
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            try:
                rc = subprocess.run(cmd, env=env, timeout=a.part_timeout_s).returncode
                got = json.loads(Path(f.name).read_text() or "{}") if rc == 0 else {}
            except subprocess.TimeoutExpired:
                rc, got = "timeout", {}
        parts[name] = got or {"part": name, "error": f"exit {rc}"}
        parts[name]["wall_s"] = perf() - t
        parts[name]["machine"] = machine(gpu)
        summary = summarize_parts(parts)
        write_report(a.json, "gpu_stack", argv, list(parts.values()), summary)
    print("summary:", json.dumps(summarize_parts(parts)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
