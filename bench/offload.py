"""Attention offload (Lamina): what moving KV and attention to attention workers buys.

CPU (default; --quick under a minute on 2 cores): a model worker (this process) and one
attention worker (its own process) on the same cores, half each.
1. Correctness: greedy tokens of concurrent requests in offload mode (q first + ping-pong)
   against the colocated engine.
2. Bytes per token and layer on the wire against Lamina's (2 + 2/G) * e * d.
3. The model worker's idle fraction (time blocked on attention workers / step time) during
   decode, plain, with q first, with ping-pong, with both; and the decode TPOT of each.

GPU (--gpu, one GPU): llama-8b bf16 (random weights). The model worker holds the weights and
`--budget-gib` of KV-worth memory; the colocated engine gets that same budget as its KV pool.
The largest batch of `--context`-token sequences each fits, and decode tokens/s and TPOT at
that batch; offload's attention worker (its own process, its own CUDA context, same GPU)
holds the KV of a batch as large as the TPOT limit allows.

    python bench/offload.py [--quick] [--json PATH]
    python bench/offload.py --gpu [--json PATH]

Summary keys: bytes_ratio_to_formula, idle_fraction_plain, idle_fraction_pingpong (and
idle_fraction_q_first, idle_fraction_both, tokens_match); with --gpu: batch_ratio_gpu,
throughput_ratio_gpu, tpot_ms_colocated_gpu, tpot_ms_offload_gpu.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run as a script, bench/ comes first on the path and bench/kvstore.py would shadow kvstore/.
sys.path[:] = [str(ROOT), *(p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench")]

from bench.report import write_report  # noqa: E402

BS = 16
MODES = {  # name: (ping-pong, q first)
    "plain": (False, False),
    "q_first": (False, True),
    "pingpong": (True, False),
    "both": (True, True),
}


def _worker_proc(model: Path, redis_url: str, ns: str, num_blocks: int, **kw):
    from services.attention import spawn

    return spawn(model, redis_url, ns, num_blocks, block_size=BS, offload=True, name="bench", **kw)


def _model_worker(model: Path, redis_url: str, ns: str, num_blocks: int, **cfg):
    """An offload engine attached to the one attention worker registered under ns."""
    from kvstore.registry import list_replicas
    from services.attention_client import layout_key
    from services.engine.config import EngineConfig
    from services.engine.engine import LLMEngine
    from services.offload_client import AttentionWorkers

    e = LLMEngine(
        model, EngineConfig(num_kv_blocks=num_blocks, block_size=BS, kv_offload=True, **cfg), seed=0
    )
    w = AttentionWorkers(
        f"bench-{uuid.uuid4().hex[:6]}", e.model_config,
        layout_key(e.model_id, e.kv_block_layout()), num_blocks, e.dtype, e.device,
        lambda: [r.address for r in list_replicas(redis_url, "attention-offload", "bench", ns)],
        1, e.config.max_num_batched_tokens, timeout_s=120,
    )  # fmt: skip
    w.connect(wait_s=30)
    e.attach_shards(w)
    return e, w


def formula_bytes(cfg, itemsize: int) -> float:
    """Lamina's bytes per token and layer: q and o (d each), k and v (d / G each)."""
    g = cfg.num_heads // cfg.num_kv_heads
    d = cfg.num_heads * cfg.head_dim
    return (2 + 2 / g) * itemsize * d


def cpu_part(model: Path, redis_url: str, seqs: int, prompt: int, steps: int) -> dict:
    import numpy as np
    import torch

    from services.engine.config import EngineConfig
    from services.engine.engine import LLMEngine
    from services.engine.sampling_params import SamplingParams

    threads = torch.get_num_threads()
    half = max(1, threads // 2)
    blocks = seqs * -(-(prompt + steps + 1) // BS) + 8
    ns = f"bench{uuid.uuid4().hex[:8]}"
    proc = _worker_proc(model, redis_url, ns, blocks, cpu_threads=max(1, threads - half))
    out: dict = {"seqs": seqs, "prompt": prompt, "steps": steps, "threads": threads}
    try:
        rng = np.random.default_rng(0)
        ref = LLMEngine(model, EngineConfig(num_kv_blocks=blocks, block_size=BS), seed=0)
        prompts = [rng.integers(0, ref.vocab_size, prompt).tolist() for _ in range(seqs)]
        greedy = SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True)
        want = [o.token_ids for o in ref.generate(prompts, greedy)]
        # The colocated engine's decode TPOT on all the cores (offload splits them in two).
        out["colocated_decode_tpot_ms"] = _decode_run(ref, prompts, greedy)["decode_tpot_ms"]
        del ref
        torch.set_num_threads(half)
        for mode, (pingpong, q_first) in MODES.items():
            e, w = _model_worker(
                model, redis_url, ns, blocks, offload_pingpong=pingpong, offload_q_first=q_first,
                max_num_seqs=seqs,
            )  # fmt: skip
            try:
                r = _decode_run(e, prompts, greedy)
            finally:
                w.close()
            out[mode] = {k: v for k, v in r.items() if k != "tokens"}
            out[mode]["tokens_match"] = r["tokens"] == want
            print(mode, out[mode], flush=True)
        cfg = e.model_config
        itemsize = torch.empty((), dtype=e.dtype).element_size()
        out["formula_bytes"] = formula_bytes(cfg, itemsize)
        out["bytes_per_token_layer"] = out["both"]["bytes_per_token_layer"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        torch.set_num_threads(threads)
    return out


def _decode_run(e, prompts, params) -> dict:
    """Generate; the counters cover the steps after every request's prefill (decode only)."""
    from services.engine.offload_plan import OffloadCounters

    counters = getattr(e.runner, "counters", None)  # an offload engine's
    ids = [f"r{i}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts, strict=True):
        e.add_request(rid, p, params)
    outs: dict[str, list[int]] = {i: [] for i in ids}
    started = False
    tpots = []
    while e.has_unfinished():
        t0 = time.perf_counter()
        for o in e.step():
            outs[o.request_id] += o.new_token_ids
        if started:
            tpots.append(time.perf_counter() - t0)
        if not started and all(outs[i] for i in ids):
            started = True
            if counters is not None:
                counters.__dict__.update(OffloadCounters().__dict__)
    out = {
        "tokens": [outs[i] for i in ids],
        "decode_tpot_ms": round(1e3 * sorted(tpots)[len(tpots) // 2], 3) if tpots else None,
        "preemptions": e.num_preemptions,
    }
    if counters is not None:
        out["idle_fraction"] = round(counters.idle_fraction, 4)
        out["bytes_per_token_layer"] = counters.bytes_per_token_layer
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: under a minute on 2 cores")
    ap.add_argument("--gpu", action="store_true", help="llama-8b bf16 on cuda:0")
    ap.add_argument("--model", type=Path, help="model dir (default: SmolLM2 if pulled, else tiny)")
    ap.add_argument("--seqs", type=int)
    ap.add_argument("--prompt", type=int)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--context", type=int, default=2048, help="GPU: tokens per sequence")
    ap.add_argument("--budget-gib", type=float, default=4.0, help="GPU: KV budget past weights")
    ap.add_argument("--tpot-ms", type=float, default=50.0, help="GPU: the interactive limit")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    from kvstore.redis_server import EmbeddedRedis
    from services.model_prep.presets import make_model

    tmp = Path(tempfile.mkdtemp(prefix="offload-"))
    with EmbeddedRedis() as redis:
        if args.gpu:
            from bench.offload_gpu import gpu_part

            model = args.model or make_model(
                "llama-8b", tmp / "llama-8b", dtype="bfloat16", write_weights=False
            )
            r = gpu_part(model, redis.url, args.context, args.budget_gib, args.tpot_ms,
                         args.steps or 8)  # fmt: skip
            results = [{"part": "gpu", **r}]
            keys = ("batch_ratio_gpu", "throughput_ratio_gpu", "tpot_ms_colocated_gpu",
                    "tpot_ms_offload_gpu")  # fmt: skip
            summary = {k: r[k] for k in keys}
        else:
            model = args.model or _default_model(tmp)
            seqs = args.seqs or (4 if args.quick else 8)
            r = cpu_part(model, redis.url, seqs, args.prompt or (32 if args.quick else 128),
                         args.steps or (12 if args.quick else 32))  # fmt: skip
            r["model"] = model.name
            results = [{"part": "cpu", **r}]
            summary = {
                "bytes_ratio_to_formula": round(r["bytes_per_token_layer"] / r["formula_bytes"], 4),
                "idle_fraction_plain": r["plain"]["idle_fraction"],
                "idle_fraction_q_first": r["q_first"]["idle_fraction"],
                "idle_fraction_pingpong": r["pingpong"]["idle_fraction"],
                "idle_fraction_both": r["both"]["idle_fraction"],
                "tokens_match": all(r[m]["tokens_match"] for m in MODES),
            }
    print("summary:", summary)
    write_report(args.json, "offload", argv, results, summary)
    return summary


def _default_model(tmp: Path) -> Path:
    from services.model_prep.presets import make_model
    from splitserve.models_pull import splitserve_home

    pulled = splitserve_home() / "models" / "smollm2-135m-instruct"
    if (pulled / "config.json").exists():
        return pulled
    return make_model("tiny", tmp / "tiny", seed=0)


if __name__ == "__main__":
    main()
