"""The engine on one GPU against its rooflines and against transformers `generate`.

One command, one run: the device's copy bandwidth and bf16 matmul peak, then for each preset
(random weights, made on the fly): decode tokens/s at batch 1, 16 and 64 (prompt 512, 128 new
tokens each, greedy, EOS ignored), prefill tokens/s at 2k and 8k prompt tokens, and transformers
at the same points. Each figure is given as a fraction of its roofline and as a ratio to
transformers. The engine also runs in its earlier configurations on the same weights (the
reference torch path; Triton kernels without CUDA graphs; graphs without async scheduling), so
each speed-up is measured in the same run.

    python bench/gpu_engine.py [--models llama-1b,llama-8b] [--json PATH] [--quick]

Rooflines. Decode: every weight plus the KV of every context read once per step at the measured
copy bandwidth (the embedding table counts, as in issue 8, though a step reads only its rows).
Prefill: the matmul FLOPs (2 x tokens x linear weights, causal attention 2 x T^2 x H x D a
layer, the LM head for the last token) at the measured bf16 matmul peak.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu_clocks import GpuClock, WaitClock
from bench.gpu_rooflines import Shape, copy_bandwidth, matmul_peak, time_cuda
from services.engine.config import EngineConfig, ModelConfig
from services.engine.engine import LLMEngine
from services.engine.sampling_params import SamplingParams
from services.model_prep.presets import make_model

DECODE_BATCHES = (1, 16, 64)
PROMPT, NEW = 512, 128
PREFILL_LENS = (2048, 8192)


# -- our engine -------------------------------------------------------------------------------


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, length), generator=g).tolist()


def engine_decode(engine: LLMEngine, batch: int, seed: int, new: int = NEW) -> dict:
    """B requests of PROMPT tokens, `new` tokens each. Decode rate counts the tokens made after
    every request has its first one, over the time since then."""
    prompts = random_prompts(batch, PROMPT, engine.model_config.vocab_size, seed)
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"d{seed}-{i}", p, params)
    started: set[str] = set()
    t_all = None
    after = total = steps_after = 0
    wait_at_all = 0.0
    first_decode_launch = first_replay = 0
    with WaitClock() as clock, GpuClock(engine) as gpu:
        while engine.has_unfinished():
            outs = engine.step()
            now = time.perf_counter()
            for o in outs:
                started.add(o.request_id)
                total += len(o.new_token_ids)
                if t_all is not None:
                    after += len(o.new_token_ids)
            if t_all is None and len(started) == batch:
                t_all, wait_at_all = now, clock.wait_s
                first_decode_launch, first_replay = len(gpu.marks), len(gpu.replays)
            elif t_all is not None:
                steps_after += 1
    t_end = time.perf_counter()
    assert total == batch * new, (total, batch * new)
    steps = max(1, steps_after)
    wait_ms = (clock.wait_s - wait_at_all) / steps * 1e3
    device = gpu.busy_and_idle_ms(first_decode_launch)
    return {
        # launch-to-launch device time of a decode step (inputs copy, forward, sampling, copy
        # back) and the mean time the device sat idle before one
        "device_busy_ms": device[0] if device else None,
        "device_idle_ms": device[1] if device else None,
        "graph_replay_ms": gpu.replay_ms(first_replay),
        "decode_tok_s": after / (t_end - t_all),
        "e2e_tok_s": total / (t_end - t0),
        "step_ms": (t_end - t_all) / steps * 1e3,
        # Host time a decode step spends on its own work (scheduling, inputs, bookkeeping),
        # i.e. not waiting for the GPU; with async scheduling it overlaps the GPU's step.
        "host_busy_ms": (t_end - t_all) / steps * 1e3 - wait_ms,
        "wall_s": t_end - t0,
    }


def engine_prefill(engine: LLMEngine, length: int, seed: int, reps: int = 3) -> dict:
    """One prompt of `length` tokens, max_tokens 1: time to its token (median of reps)."""
    times = []
    for r in range(reps):
        [p] = random_prompts(1, length, engine.model_config.vocab_size, seed + r)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.add_request(f"p{seed}-{r}", p, SamplingParams(max_tokens=1, temperature=0.0))
        while engine.has_unfinished():
            engine.step()
        times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    return {"prefill_tok_s": length / t, "time_s": t}


def gpu_decode_step_ms(engine: LLMEngine, batch: int) -> float | None:
    """Device time of one replay of the decode graph of this batch size (inputs as left by the
    last step): the step without any host work."""
    graphs = getattr(engine.runner, "_graphs", {})
    if batch not in graphs:
        return None
    graph, _ = graphs[batch]
    return time_cuda(graph.replay, 20) * 1e3


def replay_drift(engine: LLMEngine, batch: int, reps: int = 150) -> dict:
    """Back-to-back replays of one decode graph for ~1 s: the first and last 20 (ms), to see
    whether the device slows down over a sustained run (clocks, power)."""
    graph, _ = engine.runner._graphs[batch]
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        times.append((a, b))
    torch.cuda.synchronize()
    ms = [a.elapsed_time(b) for a, b in times]
    return {"first20_ms": statistics.median(ms[:20]), "last20_ms": statistics.median(ms[-20:])}


def kernel_profile(engine: LLMEngine, batch: int, path: Path) -> list[dict]:
    """Per-kernel device time of an eager decode forward at this batch (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    runner = engine.runner
    body = getattr(runner, "_decode_body", None)
    if body is None:
        return []
    for _ in range(2):
        body(batch)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            body(batch)
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        dev = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if dev:
            rows.append({"kernel": e.key[:90], "us_per_step": dev / 3, "calls": e.count // 3})
    rows.sort(key=lambda r: -r["us_per_step"])
    path.write_text(json.dumps(rows, indent=1))
    return rows[:12]


def free_gpu() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def make_engine(model_dir: Path, **cfg) -> LLMEngine:
    base = dict(
        device="cuda", dtype="bfloat16", load_format="dummy", max_num_seqs=64,
        max_num_batched_tokens=8192, max_model_len=8192 + 256, enable_prefix_caching=False,
    )  # fmt: skip
    base.update(cfg)
    return LLMEngine(model_dir, EngineConfig(**base), load_tokenizer_files=True, seed=0)


def bench_engine(model_dir: Path, shape: Shape, quick: bool, out_dir: Path, name: str) -> dict:
    res: dict = {}
    decode_batches = (1, 64) if quick else DECODE_BATCHES
    # Earlier configurations first, on the same random weights (same seed).
    variants = [
        ("torch", dict(kernels="torch"), (1, 64)),
        ("triton_eager", dict(enforce_eager=True, async_scheduling=False), (1, 64)),
        ("graphs_sync", dict(async_scheduling=False), (1, 64)),
        ("full", dict(), decode_batches),
        ("full_gc_unfrozen", dict(), (64,)),  # the same, the cyclic GC left as Python has it
    ]
    if quick:
        variants = [v for v in variants if v[0] == "full"]
    for label, cfg, batches in variants:
        t = time.perf_counter()
        engine = make_engine(model_dir, **cfg)
        if label == "full_gc_unfrozen":
            gc.unfreeze()
        build_s = time.perf_counter() - t
        engine_decode(engine, 2, seed=999, new=8)  # warm-up: Triton JIT, allocator
        v: dict = {"build_s": build_s, "num_kv_blocks": engine.pool.num_blocks, "decode": {}}
        for b in batches:
            r = engine_decode(engine, b, seed=b)
            r["roofline_tok_s"] = shape.decode_roofline(b, BW, PROMPT + NEW / 2)
            r["fraction_of_roofline"] = r["decode_tok_s"] / r["roofline_tok_s"]
            r["gpu_step_ms"] = gpu_decode_step_ms(engine, b)
            v["decode"][b] = r
        if label in ("full", "torch"):
            v["prefill"] = {}
            for t_len in PREFILL_LENS if label == "full" else PREFILL_LENS[-1:]:
                engine_prefill(engine, 1024, seed=500)  # warm-up of the prefill shapes
                r = engine_prefill(engine, t_len, seed=t_len)
                r["roofline_tok_s"] = shape.prefill_roofline(t_len, PEAK)
                r["fraction_of_peak"] = r["prefill_tok_s"] / r["roofline_tok_s"]
                v["prefill"][t_len] = r
        if label == "full":
            v["replay_drift_b64"] = replay_drift(engine, 64)
            v["kernels_b1"] = kernel_profile(engine, 1, out_dir / f"kernels-{name}-b1.json")
            v["kernels_b64"] = kernel_profile(engine, 64, out_dir / f"kernels-{name}-b64.json")
        res[label] = v
        print(f"  {label}: " + json.dumps(_short(v)), flush=True)
        engine = None
        free_gpu()
    return res


def _short(v: dict) -> dict:
    out = {k: round(r["decode_tok_s"], 1) for k, r in v.get("decode", {}).items()}
    out.update({f"pf{k}": round(r["prefill_tok_s"]) for k, r in v.get("prefill", {}).items()})
    return out


# -- transformers -----------------------------------------------------------------------------


class _TokenClock:
    """A logits processor that only timestamps: called once per generated token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def bench_transformers(model_dir: Path, shape: Shape, quick: bool, new: int) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM, LogitsProcessorList

    t = time.perf_counter()
    cfg = AutoConfig.from_pretrained(model_dir)
    with torch.device("cuda"):
        hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    res: dict = {"build_s": time.perf_counter() - t, "decode": {}, "prefill": {}}
    vocab = shape.vocab

    def generate(batch: int, n: int, seed: int) -> dict:
        ids = torch.tensor(random_prompts(batch, PROMPT, vocab, seed), device="cuda")
        clock = _TokenClock()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                min_new_tokens=n, do_sample=False, pad_token_id=0,
                logits_processor=LogitsProcessorList([clock]),
            )  # fmt: skip
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        assert out.shape[1] == PROMPT + n
        span = clock.times[-1] - clock.times[0]
        return {
            "decode_tok_s": batch * (n - 1) / span,
            "e2e_tok_s": batch * n / wall,
            "wall_s": wall,
            "new_tokens": n,
        }

    generate(1, 4, seed=1000)  # warm-up
    for b in (1, 64) if quick else DECODE_BATCHES:
        r = generate(b, new, seed=b)
        r["roofline_tok_s"] = shape.decode_roofline(b, BW, PROMPT + NEW / 2)
        r["fraction_of_roofline"] = r["decode_tok_s"] / r["roofline_tok_s"]
        res["decode"][b] = r
    for t_len in PREFILL_LENS:
        ids = torch.tensor(random_prompts(1, t_len, vocab, t_len), device="cuda")
        with torch.inference_mode():
            t = time_cuda(lambda ids=ids: hf(ids, logits_to_keep=1), 3, warmup=1)
        res["prefill"][t_len] = {
            "prefill_tok_s": t_len / t,
            "time_s": t,
            "roofline_tok_s": shape.prefill_roofline(t_len, PEAK),
            "fraction_of_peak": t_len / t / shape.prefill_roofline(t_len, PEAK),
        }
    print("  transformers: " + json.dumps(_short(res)), flush=True)
    hf = None  # the model goes with the last reference
    free_gpu()
    return res


# -- report -----------------------------------------------------------------------------------


BW = 0.0
PEAK = 0.0


def main() -> None:
    global BW, PEAK
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="llama-1b,llama-8b")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="batches 1 and 64, full config only")
    ap.add_argument("--hf-new-tokens", type=int, default=NEW)
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args()
    out_dir = args.json.parent if args.json else Path(tempfile.mkdtemp())
    out_dir.mkdir(parents=True, exist_ok=True)

    t_start = time.perf_counter()
    props = torch.cuda.get_device_properties(0)
    BW = copy_bandwidth()
    PEAK = matmul_peak()
    report: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "device": f"{props.name}, {props.multi_processor_count} SMs, "
        f"{props.total_memory / 2**30:.0f} GiB",
        "software": f"torch {torch.__version__}, Python {platform.python_version()}, "
        f"triton {_version('triton')}, transformers {_version('transformers')}",
        "command": " ".join(["python", *sys.argv]),
        "copy_bandwidth_GBps": BW / 1e9,
        "bf16_matmul_TFLOPs": PEAK / 1e12,
        "models": {},
    }
    print(f"{report['device']}; copy {BW / 1e12:.2f} TB/s; bf16 matmul {PEAK / 1e12:.0f} "
          "TFLOP/s", flush=True)  # fmt: skip
    for name in args.models.split(","):
        model_dir = make_model(name, Path(tempfile.mkdtemp()) / name, write_weights=False)
        shape = Shape.of(ModelConfig.from_dir(model_dir))
        print(f"{name}: {shape.params / 1e9:.2f} B params", flush=True)
        m: dict = {"params": shape.params}
        if not args.skip_hf:
            m["transformers"] = bench_transformers(model_dir, shape, args.quick, args.hf_new_tokens)
        m["splitserve"] = bench_engine(model_dir, shape, args.quick, out_dir, name)
        report["models"][name] = m
    report["wall_s"] = time.perf_counter() - t_start
    report["goals"] = goals(report)
    summarize(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str) + "\n")


def _version(mod: str) -> str:
    try:
        return __import__(mod).__version__
    except ImportError:
        return "absent"


def goals(report: dict) -> list[dict]:
    """Issue 8's goals, on the llama-8b shape."""
    m = report["models"].get("llama-8b")
    if m is None:
        return []
    ours = m["splitserve"]["full"]
    hf = m.get("transformers", {})
    rows = [
        ("decode b1, fraction of roofline", ours["decode"][1]["fraction_of_roofline"], 0.8),
        ("decode b64, fraction of roofline", ours["decode"][64]["fraction_of_roofline"], 0.7),
        ("prefill 8k, fraction of bf16 peak", ours["prefill"][8192]["fraction_of_peak"], 0.6),
    ]
    if hf:
        ratio = ours["decode"][1]["decode_tok_s"] / hf["decode"][1]["decode_tok_s"]
        rows.append(("decode b1, ratio to transformers", ratio, 10.0))
    return [{"goal": g, "value": v, "target": t, "met": v >= t} for g, v, t in rows]


def summarize(report: dict) -> None:
    print(f"\n{report['device']} | {report['software']}")
    print(f"copy {report['copy_bandwidth_GBps']:.0f} GB/s, bf16 matmul "
          f"{report['bf16_matmul_TFLOPs']:.0f} TFLOP/s, wall {report['wall_s']:.0f} s")  # fmt: skip
    for name, m in report["models"].items():
        hf = m.get("transformers", {})
        for label, v in m["splitserve"].items():
            for b, r in v.get("decode", {}).items():
                ref = hf.get("decode", {}).get(b)
                ratio = f"{r['decode_tok_s'] / ref['decode_tok_s']:.1f}x hf" if ref else ""
                gpu = f" gpu {r['gpu_step_ms']:.2f} ms" if r.get("gpu_step_ms") else ""
                gpu += f" host {r['host_busy_ms']:.2f} ms"
                if r.get("device_idle_ms") is not None:
                    gpu += f" dev {r['device_busy_ms']:.2f}+idle {r['device_idle_ms']:.2f} ms"
                if r.get("graph_replay_ms") is not None:
                    gpu += f" (graph {r['graph_replay_ms']:.2f})"
                print(f"{name:9} {label:13} decode b{b:<3} {r['decode_tok_s']:9.1f} tok/s "
                      f"{r['fraction_of_roofline']:6.1%} roof  step {r['step_ms']:.2f} ms{gpu} "
                      f"{ratio}")  # fmt: skip
            for t, r in v.get("prefill", {}).items():
                ref = hf.get("prefill", {}).get(t)
                ratio = f"{r['prefill_tok_s'] / ref['prefill_tok_s']:.2f}x hf" if ref else ""
                print(f"{name:9} {label:13} prefill {t:<5} {r['prefill_tok_s']:9.0f} tok/s "
                      f"{r['fraction_of_peak']:6.1%} peak {ratio}")  # fmt: skip
        for b, r in hf.get("decode", {}).items():
            print(f"{name:9} transformers  decode b{b:<3} {r['decode_tok_s']:9.1f} tok/s "
                  f"{r['fraction_of_roofline']:6.1%} roof  e2e {r['e2e_tok_s']:.1f}")  # fmt: skip
        for t, r in hf.get("prefill", {}).items():
            print(f"{name:9} transformers  prefill {t:<5} {r['prefill_tok_s']:9.0f} tok/s "
                  f"{r['fraction_of_peak']:6.1%} peak")  # fmt: skip
    for name, m in report["models"].items():
        drift = m["splitserve"].get("full", {}).get("replay_drift_b64")
        if drift:
            print(f"{name} b64 graph replays: first 20 {drift['first20_ms']:.2f} ms, "
                  f"last 20 {drift['last20_ms']:.2f} ms")  # fmt: skip
    for g in report["goals"]:
        print(f"goal llama-8b {g['goal']}: {g['value']:.3g} (target {g['target']:g}) "
              f"{'met' if g['met'] else 'MISSED'}")  # fmt: skip


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
