"""FastSwitch vs recompute vs per-block swap on one GPU, under priority churn (one command).

The llama-8b preset (random bf16 weights: load_format dummy), a KV pool sized so that
preemption happens, multi-turn sessions (each turn's prompt is the conversation so far plus a
new message), Poisson arrivals of sessions, and priorities that change (loadgen.churn, one
stream per session, a step being one engine step): with probability --churn per step
(FastSwitch's update frequency 0.04), every session gets a new priority (pattern random) or
moves one level (pattern markov), running requests included. Scheduling policy "priority": a waiting
request of a better priority preempts running ones when blocks are short.

The same workload runs under each preemption mode; reported: P99 TTFT, P99.9 TBT, throughput,
preemptions, swap bandwidth (bytes copied / time the copies took) against the pinned
host<->device copy bandwidth measured here, and how many requests' tokens match the recompute
run's (bf16 kernels are not batch-invariant, so a few may differ in any two runs).

    python bench/fairness_gpu.py --json bench/results/fairness-gpu-h200.json
    python bench/fairness_gpu.py --quick       # a short smoke run
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from bench.report import write_report
from loadgen.churn import PriorityChurn
from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.engine.sampling_params import SamplingParams
from services.model_prep.presets import make_model

MODES = ("recompute", "swap", "fastswitch")


def pinned_bandwidth(nbytes: int = 1 << 30) -> float:
    """Bytes/s of one large pinned copy, the mean of device->host and host->device."""
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    out = []
    for src, dst in ((dev, host), (host, dev)):
        dst.copy_(src, non_blocking=True)  # warm-up
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(3):
            dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        out.append(3 * nbytes / (start.elapsed_time(end) / 1e3))
    del dev, host
    return sum(out) / 2


def workload(args) -> list[dict]:
    """Sessions: arrival time (s), and per turn the new message's tokens and max_tokens."""
    rng = random.Random(args.seed)
    t, sessions = 0.0, []
    for _ in range(args.sessions):
        t += rng.expovariate(args.rate)
        turns = [
            ([rng.randrange(100, args.vocab) for _ in range(rng.randint(64, args.msg))],
             rng.randint(args.out // 2, args.out))
            for _ in range(rng.randint(2, args.turns))
        ]  # fmt: skip
        sessions.append({"arrival": t, "turns": turns})
    return sessions


def warm_up(engine: LLMEngine, args) -> None:
    """Kernels compiled and graphs captured before the clock starts: otherwise the first mode
    measured pays for them (on an H200: half the steps and 25x the P99 TTFT of the modes after
    it, with no preemption at all)."""
    rng = random.Random(-1)
    n = min(args.max_seqs, max(1, args.kv_blocks * 16 // 1100))
    prompts = [[rng.randrange(args.vocab) for _ in range(rng.randint(16, 1000))] for _ in range(n)]
    engine.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    engine.scheduler.num_preemptions = 0


def run_mode(model_dir: Path, mode: str, sessions: list[dict], args) -> dict:
    cfg = EngineConfig(
        device=args.device, dtype="bfloat16" if args.device != "cpu" else "float32",
        load_format="dummy", max_num_seqs=args.max_seqs,
        max_num_batched_tokens=2048, max_model_len=args.max_len, num_kv_blocks=args.kv_blocks,
        scheduling_policy="priority", preemption_mode=mode, swap_space_blocks=args.swap_blocks,
    )  # fmt: skip
    engine = LLMEngine(model_dir, cfg, load_tokenizer_files=False, seed=0)
    warm_up(engine, args)
    # The same updates at the same steps in every mode: a function of the seed and the step.
    clock = PriorityChurn(args.pattern, args.churn, args.levels, 1.0, seed=args.seed).clock()
    applied = 0  # updates already applied to the running requests
    # Per session: the conversation so far, the turn it is on, when its next turn arrives.
    state = [{"ctx": [], "turn": 0, "due": s["arrival"]} for s in sessions]
    live: dict[str, dict] = {}  # request id -> {session, t0, times, tokens}
    done: list[dict] = []
    prio: dict[str, int] = {}
    t_start = time.monotonic()
    steps = 0
    while True:
        now = time.monotonic() - t_start
        if now > args.max_s:
            break
        for i, st in enumerate(state):
            s = sessions[i]
            if st["due"] is not None and st["due"] <= now and st["turn"] < len(s["turns"]):
                msg, max_out = s["turns"][st["turn"]]
                prompt = (st["ctx"] + msg)[-(args.max_len - max_out - 1) :]
                rid = f"s{i}t{st['turn']}"
                p = clock.at(i, steps)
                params = SamplingParams(max_tokens=max_out, temperature=0.0, ignore_eos=True)
                engine.add_request(rid, prompt, params, priority=p)
                prio[rid] = p
                live[rid] = {"session": i, "prompt": prompt, "t0": time.monotonic(), "times": [],
                             "tokens": []}  # fmt: skip
                st["due"] = None
        if not engine.has_unfinished():
            if all(st["turn"] >= len(sessions[i]["turns"]) for i, st in enumerate(state)):
                break
            time.sleep(0.001)
            continue
        if clock.updates_before(steps) != applied:  # a priority update (FastSwitch's churn)
            applied = clock.updates_before(steps)
            for rid, r in live.items():
                p = clock.at(r["session"], steps)
                if p != prio[rid] and engine.set_priority(rid, p):
                    prio[rid] = p
        outs = engine.step()
        steps += 1
        t = time.monotonic()
        for o in outs:
            r = live[o.request_id]
            r["times"] += [t] * len(o.new_token_ids)
            r["tokens"] += o.new_token_ids
            if o.finished:
                live.pop(o.request_id)
                st = state[r["session"]]
                st["ctx"] = r["prompt"] + r["tokens"]
                st["turn"] += 1
                st["due"] = t - t_start  # the next message follows at once
                done.append({"rid": o.request_id, **r})
    if args.device != "cpu":
        torch.cuda.synchronize()
    elapsed = time.monotonic() - t_start
    ttft = [r["times"][0] - r["t0"] for r in done if r["times"]]
    tbt = [b - a for r in done for a, b in zip(r["times"], r["times"][1:], strict=False) if b > a]
    out_tokens = sum(len(r["tokens"]) for r in done)
    res = {
        "mode": mode,
        "requests_done": len(done),
        "unfinished": len(live),
        "steps": steps,
        "seconds": elapsed,
        "output_tokens_per_s": out_tokens / elapsed,
        "p99_ttft_s": float(np.percentile(ttft, 99)) if ttft else None,
        "p95_ttft_s": float(np.percentile(ttft, 95)) if ttft else None,
        "p999_tbt_s": float(np.percentile(tbt, 99.9)) if tbt else None,
        "p99_tbt_s": float(np.percentile(tbt, 99)) if tbt else None,
        "preemptions": engine.num_preemptions,
        "tokens": {r["rid"]: r["tokens"] for r in done},
    }
    if engine.swapper is not None:
        sw, sp = engine.swapper, engine.scheduler.swap
        sw.wait_all()
        res |= {
            "swap_bytes": sw.bytes_copied,
            "swap_copy_s": sw.copy_s,
            "swap_ops": sw.num_ops,
            "swap_bw_Bps": sw.bytes_copied / sw.copy_s if sw.copy_s else None,
            "swapped_out": sp.num_swapped_out,
            "swap_fallbacks": sp.num_fallbacks,
            "blocks_reused": sp.blocks_reused,
        }
        sw.close()
    del engine
    gc.collect()
    if args.device != "cpu":
        torch.cuda.empty_cache()
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--preset", default="llama-8b")
    ap.add_argument("--sessions", type=int, default=120)
    ap.add_argument("--rate", type=float, default=2.0, help="sessions per second")
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--msg", type=int, default=600, help="most tokens of a new message")
    ap.add_argument("--out", type=int, default=256, help="most output tokens of a turn")
    ap.add_argument("--kv-blocks", type=int, default=1000, help="16-token blocks on the GPU")
    ap.add_argument("--swap-blocks", type=int, default=8000, help="host blocks (llama-8b: 2 MiB)")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of the driver only")
    ap.add_argument("--max-seqs", type=int, default=64)
    ap.add_argument("--churn", type=float, default=0.04, help="priority updates per step")
    ap.add_argument("--pattern", choices=("random", "markov"), default="random")
    ap.add_argument("--levels", type=int, default=4)
    ap.add_argument("--max-s", type=float, default=130.0, help="per mode, at most")
    ap.add_argument("--max-len", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=30000, help="token ids drawn below this")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.quick:
        args.sessions, args.max_s, args.kv_blocks = 24, 40.0, 800
    cuda = args.device != "cpu"
    if cuda and not torch.cuda.is_available():
        sys.exit("fairness_gpu needs a CUDA device (or --device cpu for a smoke run)")
    bw = pinned_bandwidth() if cuda else float("nan")
    sessions = workload(args)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model(args.preset, Path(tmp) / args.preset, write_weights=False)
        results = [run_mode(model_dir, m, sessions, args) for m in MODES]
    by = {r["mode"]: r for r in results}
    ref = by["recompute"]["tokens"]
    for r in results:
        common = [k for k in r["tokens"] if k in ref]
        r["token_match"] = sum(r["tokens"][k] == ref[k] for k in common) / max(1, len(common))
        r.pop("tokens")
    fs = by["fastswitch"]

    def gain(key: str) -> float | None:
        base = [by[m][key] for m in ("recompute", "swap") if by[m][key]]
        return min(base) / fs[key] if base and fs[key] else None

    summary = {
        "p99_ttft_gain": gain("p99_ttft_s"),
        "p999_tbt_gain": gain("p999_tbt_s"),
        "throughput_ratio": fs["output_tokens_per_s"]
        / max(by["recompute"]["output_tokens_per_s"], by["swap"]["output_tokens_per_s"]),
        "swap_bw_fraction": (fs.get("swap_bw_Bps") or 0) / bw,
        "per_block_swap_bw_fraction": (by["swap"].get("swap_bw_Bps") or 0) / bw,
        "pinned_copy_GBps": bw / 1e9,
    }
    for r in results:
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
    print(summary)
    write_report(args.json, "fairness_gpu", argv, results, summary)


if __name__ == "__main__":
    main()
