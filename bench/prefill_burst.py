"""Where the prefill replica's burst rate goes (issue 19, item 4): the same burst of the trace's
prompts through `splitserve up`'s prefill replica (examples/gpu-llama8b.yaml: prefill and
decode sharing one GPU) three ways, each warmed by a burst of its own first:

  pd         prefill, publish to the device pool, decode pulls the KV and makes a second token
             (what bench/gpu_stack.py measures as prefill_server_ratio);
  unpulled   prefill and publish, but no decode call: the pins just lapse;
  first-only max_tokens 1: prefill alone, the KV kept in the replica's own store.

Each way's rate is the burst's prompt tokens over the time to its last first token, with the
replica's own split (queued, in prefill steps, publishing) per request and its engine steps
meanwhile (count, mean time, mean tokens: slower steps or emptier ones than the bare engine's).

    python bench/prefill_burst.py [--json PATH] [--ways pd,unpulled,first-only]
    python bench/prefill_burst.py --cpu-smoke           # tiny preset on the CPU: plumbing
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import gpu_stack  # noqa: E402
from bench.report import cuda_name, machine, write_report  # noqa: E402
from bench.step_stats import step_counters, step_split  # noqa: E402

WAYS = ("pd", "unpulled", "first-only")
perf = time.perf_counter


async def prefill_only(pre: str, dec: str, planned: list, max_tokens: int, metrics: str) -> dict:
    """The burst through the Prefill RPC alone (no decode): max_tokens 1 ends each request
    there; 2 publishes its KV for a decode that never comes."""
    import numpy as np

    from router.pd_client import Call, PDClient
    from services.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    client = PDClient(decode=dec, prefill=pre, timeout_s=300)

    async def one(p) -> tuple[float, dict, int] | None:
        try:
            first, _ = await client.prefill_first(Call(list(p.prompt.ids), params, f"pb-{p.index}"))
        except Exception as e:  # a failure is counted, not raised: the rate needs the rest
            print(f"request {p.index} failed: {e!r}"[:300], flush=True)
            return None
        t = first.prefill_timings
        return perf(), {"queue_ms": t.queue_ms, "prefill_ms": t.prefill_ms,
                        "publish_ms": t.publish_ms}, len(p.prompt.ids)  # fmt: skip

    half = len(planned) // 2
    await asyncio.gather(*(one(p) for p in planned[:half]))  # warms
    before = await asyncio.to_thread(step_counters, metrics)
    t0 = perf()
    got = [g for g in await asyncio.gather(*(one(p) for p in planned[half:])) if g]
    await client.close()
    out = {"requests": len(planned) - half, "completed": len(got)}
    out.update(step_split(before, step_counters(metrics)))
    if got:
        wall = max(g[0] for g in got) - t0
        tokens = sum(g[2] for g in got)
        out.update(prompt_tokens=tokens, wall_s=wall, tok_s=tokens / wall)
        for key in ("queue_ms", "prefill_ms", "publish_ms"):
            out[f"{key}_mean"] = float(np.mean([g[1][key] for g in got]))
    return out


def run(ways: list[str], smoke: bool) -> dict:
    from bench.up_process import config_session, free_port
    from kvstore.registry import list_replicas
    from splitserve.up import resolve_model_path

    s = gpu_stack.settings(smoke)
    cfg = gpu_stack.app_config("disaggregated", smoke, free_port(), free_port())
    spec = gpu_stack.model_spec("disaggregated", smoke)
    model_dir = resolve_model_path(spec)
    result: dict = {"config": cfg, "ways": {}}
    with config_session(cfg, stop_timeout_s=120) as up:
        pre_replica = list_replicas(up.redis, "prefill", spec.name)[0]
        pre, metrics = pre_replica.address, pre_replica.metrics_address
        dec = list_replicas(up.redis, "decode", spec.name)[0].address
        for k, way in enumerate(ways):
            base = 100_000 * (k + 1)
            planned = gpu_stack.burst(model_dir, s, base) + gpu_stack.burst(
                model_dir, s, base + 50_000
            )
            if way == "pd":
                got = asyncio.run(gpu_stack.pd_burst(pre, dec, planned, metrics))
            else:
                n = 2 if way == "unpulled" else 1
                got = asyncio.run(prefill_only(pre, dec, planned, n, metrics))
            result["ways"][way] = got
            print(f"{way}: {json.dumps(got)}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--ways", default=",".join(WAYS))
    ap.add_argument("--cpu-smoke", action="store_true")
    a = ap.parse_args(argv)
    ways = [w for w in a.ways.split(",") if w]
    bad = [w for w in ways if w not in WAYS]
    if bad or not ways:
        ap.error(f"--ways: choose from {', '.join(WAYS)}")
    gpu = "cpu smoke" if a.cpu_smoke else cuda_name()
    result = run(ways, a.cpu_smoke)
    rates = {w: r.get("tok_s") for w, r in result["ways"].items()}
    summary = {f"{w}_tok_s": v for w, v in rates.items()}
    write_report(a.json, "prefill_burst", argv, [result | {"machine": machine(gpu)}], summary)
    print("summary:", json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
