"""Prefill throughput of the engine on a GPU under a queue of real prompt lengths: what one
prefill replica can take before its queue grows (the disaggregated goodput's first limit).

The Azure conversation excerpt's first N prompt lengths (random token ids, llama-8b preset,
random bf16 weights) are all queued at once with max_tokens 1; the engine steps until they are
done. Prompt tokens/s against the roofline of the measured bf16 matmul peak, for several
per-step token budgets, with and without KV export (what a prefill server does per request).
With --profile, the largest CPU and CUDA costs of one budget's run (torch.profiler).

    python3 bench/gpu_prefill.py [--json PATH] [--requests 64] [--profile]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu_engine import free_gpu, make_engine, random_prompts
from bench.gpu_rooflines import Shape, matmul_peak
from bench.report import machine, write_report
from loadgen.readers import read_trace
from services.engine.config import ModelConfig
from services.engine.sampling_params import SamplingParams
from services.model_prep.presets import make_model


def run_queue(engine, lengths: list[int], export: bool, seed: int) -> dict:
    vocab = engine.model_config.vocab_size
    prompts = [random_prompts(1, n, vocab, seed + i)[0] for i, n in enumerate(lengths)]
    params = SamplingParams(max_tokens=1, temperature=0.0)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"q{seed}-{i}", p, params, export_kv=export)
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    torch.cuda.synchronize()
    t = time.perf_counter() - t0
    return {"seconds": t, "steps": steps, "prompt_tok_s": sum(lengths) / t}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--budgets", default="2048,8192")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--preset", default="llama-8b")
    args = ap.parse_args()
    trace = read_trace("azure-conv")
    lengths = [min(8000, max(2, r.prompt_tokens)) for r in trace.requests[: args.requests]]
    peak = matmul_peak()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        model = make_model(args.preset, Path(tmp) / args.preset, write_weights=False)
        shape = Shape.of(ModelConfig.from_dir(model))
        roof_s = sum(shape.prefill_flops(n) for n in lengths) / peak
        for budget in (int(b) for b in args.budgets.split(",")):
            engine = make_engine(model, max_num_batched_tokens=budget, max_num_seqs=128)
            run_queue(engine, lengths[:8], False, 999)  # warm-up: kernels, allocator
            for export in (False, True):
                r = run_queue(engine, lengths, export, 0)
                r |= {"budget": budget, "export_kv": export, "of_roofline": roof_s / r["seconds"]}
                results.append(r)
                print(f"budget {budget:5d} export {export!s:5}: {r['prompt_tok_s']:8.0f} tok/s, "
                      f"{r['steps']} steps, {r['of_roofline']:.1%} of the matmul roofline",
                      flush=True)  # fmt: skip
            if args.profile:
                profile(engine, lengths, budget)
            del engine
            free_gpu()
    summary = {
        "matmul_peak_tflops": peak / 1e12,
        "prompt_tokens": sum(lengths),
        "requests": len(lengths),
        **{
            f"tok_s_b{r['budget']}{'_export' if r['export_kv'] else ''}": r["prompt_tok_s"]
            for r in results
        },
    }
    gpu = torch.cuda.get_device_name(0)
    write_report(args.json, "gpu_prefill", None, results, summary, machine=machine(gpu))


def profile(engine, lengths: list[int], budget: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        run_queue(engine, lengths[:16], True, 5)
    for key in ("self_cpu_time_total", "self_cuda_time_total"):
        print(f"-- budget {budget}, top by {key}", flush=True)
        print(p.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=60))


if __name__ == "__main__":
    main()
