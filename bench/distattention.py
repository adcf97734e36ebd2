"""DistAttention: how long a context lent memory serves, and what splitting a context costs.

1. Longest context served token-exact with 1, 2 and 4 holders at fixed memory per holder: a
   decoder whose own pool is M blocks, plus N - 1 attention replicas lending M blocks each
   (real gRPC services and Redis ledger). For each N, the longest context (prompt + output)
   whose greedy tokens equal a single large-pool engine's. Goal: >= 0.9 x N times N = 1's.
2. Decode time per step with every sequence's context split over holders (local pool + one
   attention replica in its own process, over gRPC on loopback) against the same contexts in
   one local pool, with the timing split into where it goes.

    python bench/distattention.py [--quick] [--json PATH]          # CPU, tiny + SmolLM2
    python bench/distattention.py --gpu [--json PATH]              # one GPU, llama-8b bf16

Summary keys: context_tokens_1/2/4, context_ratio_2, context_ratio_4, and for the split
decode cpu_split_tpot_ms, cpu_local_tpot_ms, cpu_split_throughput_ratio (or gpu_* with --gpu,
where gpu_split_throughput_ratio is the issue's goal: >= 0.8).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.report import write_report  # noqa: E402

BS = 16


class _Loop:
    """An event loop on a thread, hosting in-process attention replicas."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def run(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


def _decoder(model_dir: Path, redis_url: str, ns: str, num_blocks: int, **cfg):
    from kvstore.lending import Ledger
    from services.attention_client import AttentionPeers, layout_key
    from services.engine.config import EngineConfig
    from services.engine.engine import LLMEngine

    e = LLMEngine(model_dir, EngineConfig(num_kv_blocks=num_blocks, block_size=BS, **cfg))
    peers = AttentionPeers(
        Ledger(redis_url, ns), f"bench-{uuid.uuid4().hex[:6]}",
        layout_key(e.model_id, e.kv_block_layout()),
    )  # fmt: skip
    e.attach_remote_kv(peers)
    return e, peers


def _replica(lt: _Loop, model_dir: Path, redis_url: str, ns: str, num_blocks: int, **cfg):
    from kvstore.config import Membership
    from services.attention import AttentionServer
    from services.config import AttentionConfig
    from services.engine.config import EngineConfig

    config = AttentionConfig(
        name="bench", model=model_dir, cluster=Membership(redis_url=redis_url, namespace=ns),
        engine=EngineConfig(num_kv_blocks=num_blocks, block_size=BS, **cfg),
    )  # fmt: skip
    s = AttentionServer(config)
    lt.run(s.start())
    return s


def longest_context(model_dir: Path, redis_url: str, holders: int, per_holder: int, ref) -> dict:
    """The longest context (prompt + 8 tokens) served token-exact with `holders` holders of
    per_holder blocks each: try the full capacity, then one block less, ..."""
    from services.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    ns = f"bench{uuid.uuid4().hex[:8]}"
    lt = _Loop()
    reps = [_replica(lt, model_dir, redis_url, ns, per_holder) for _ in range(holders - 1)]
    engine, peers = _decoder(model_dir, redis_url, ns, per_holder, max_num_batched_tokens=256)
    if holders == 1:
        engine.scheduler.remote = engine.runner.remote = None  # the local pool alone
    t0 = time.monotonic()
    best, tried = 0, []
    try:
        for length in range(holders * per_holder * BS, 0, -BS):
            prompt = ref.prompt(length - params.max_tokens)
            try:
                outs = engine.generate([prompt], params)
            except Exception as e:  # the engine refuses what can never fit
                tried.append((length, type(e).__name__))
                continue
            ok = outs[0].finish_reason == "length" and outs[0].token_ids == ref.tokens(prompt)
            tried.append((length, ok))
            if ok:
                best = length
                break
    finally:
        peers.close()
        for r in reps:
            lt.run(r.stop(drain_s=0.5))
    return {
        "holders": holders, "blocks_per_holder": per_holder, "longest_context": best,
        "tries": len(tried), "seconds": round(time.monotonic() - t0, 2),
        "batches_on_replicas": sum(r.layer_batches for r in reps),
    }  # fmt: skip


class _Reference:
    """Greedy tokens of one engine with a pool that holds anything."""

    def __init__(self, model_dir: Path, vocab: int) -> None:
        from services.engine.config import EngineConfig
        from services.engine.engine import LLMEngine
        from services.engine.sampling_params import SamplingParams

        self.engine = LLMEngine(model_dir, EngineConfig(num_kv_blocks=1024, block_size=BS))
        self.params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        self.vocab = vocab

    def prompt(self, n: int) -> list[int]:
        import random

        rng = random.Random(n)
        return [rng.randrange(self.vocab) for _ in range(n)]

    def tokens(self, prompt: list[int]) -> list[int]:
        return self.engine.generate([prompt], self.params)[0].token_ids


def split_decode(
    model_dir: Path, redis_url: str, seqs: int, context: int, steps: int, device: str, dtype: str
) -> dict:
    """Decode steps of `seqs` sequences of `context` tokens: all local, then each split in
    half between the local pool and one attention replica in its own process."""
    import numpy as np
    import torch

    from services.engine.config import EngineConfig
    from services.engine.engine import LLMEngine
    from services.engine.sampling_params import SamplingParams
    from services.engine.sched_output import NewRequestData, ScheduledSeq, SchedulerOutput

    blocks_per_seq = -(-(context + steps) // BS)
    half = blocks_per_seq // 2
    ns = f"bench{uuid.uuid4().hex[:8]}"
    proc = _replica_process(model_dir, redis_url, ns, seqs * (blocks_per_seq - half) + 8, device,
                            dtype)  # fmt: skip
    try:
        engine = LLMEngine(
            model_dir,
            EngineConfig(
                num_kv_blocks=seqs * blocks_per_seq + 8, block_size=BS, device=device,
                dtype=dtype, load_format="dummy" if device != "cpu" else "auto",
                max_num_seqs=max(seqs, 1), max_model_len=context + steps + BS,
            ),
        )  # fmt: skip
        from kvstore.lending import Ledger
        from services.attention_client import AttentionPeers, layout_key

        layout = layout_key(engine.model_id, engine.kv_block_layout())
        peers = AttentionPeers(Ledger(redis_url, ns), "bench-decoder", layout)
        engine.attach_remote_kv(peers)
        runner = engine.runner
        params = SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True)
        vocab = engine.vocab_size
        rng = np.random.default_rng(0)
        results = {}
        for mode in ("local", "split"):
            so = SchedulerOutput()
            rids, held = [], []
            for i in range(seqs):
                rid = f"{mode}-{i}"
                blocks = engine.pool.allocate(blocks_per_seq)
                remote = []
                if mode == "split":
                    seg = peers.borrow(rid, half, blocks_per_seq - half)
                    assert seg is not None, "the replica did not lend"
                    engine.pool.release(blocks[half:])
                    blocks, remote = blocks[:half], [seg]
                held.append(blocks)
                prompt = rng.integers(0, vocab, context).tolist()
                so.new_requests.append(
                    NewRequestData(rid, prompt, [], params, blocks, context - 1, remote)
                )
                so.decodes.append(ScheduledSeq(rid, context - 1, 1, [], True))
                rids.append(rid)
            times = []
            for step in range(steps):
                if step:
                    so = SchedulerOutput(
                        decodes=[ScheduledSeq(r, context - 1 + step, 1, [], True) for r in rids]
                    )
                if device != "cpu":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                runner.run(so)
                if device != "cpu":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            warm = times[1:] if len(times) > 2 else times
            results[mode] = {"tpot_ms": round(1e3 * float(np.median(warm)), 3),
                             "steps_ms": [round(1e3 * t, 2) for t in times]}  # fmt: skip
            runner.requests.update(SchedulerOutput(finished_ids=rids))
            for rid, blocks in zip(rids, held, strict=True):
                peers.release(rid)
                engine.pool.release(blocks)
        peers.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    local, split = results["local"]["tpot_ms"], results["split"]["tpot_ms"]
    return {
        "seqs": seqs, "context": context, "device": device, "dtype": dtype,
        "local_tpot_ms": local, "split_tpot_ms": split,
        "split_throughput_ratio": round(local / split, 3),
        "local_steps_ms": results["local"]["steps_ms"],
        "split_steps_ms": results["split"]["steps_ms"],
    }  # fmt: skip


def _replica_process(model_dir, redis_url, ns, num_blocks, device, dtype) -> subprocess.Popen:
    """An attention replica in a process of its own; returns once it serves."""
    code = "import sys; from bench.distattention import serve_replica; serve_replica(*sys.argv[1:])"
    args = [str(model_dir), redis_url, ns, str(num_blocks), device, dtype]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, env=env, text=True
    )
    if not proc.stdout.readline():  # its address, once serving
        raise RuntimeError(f"the attention replica exited ({proc.wait()})")
    return proc


def serve_replica(model_dir, redis_url, ns, num_blocks, device, dtype) -> None:
    """The replica process: serve until SIGTERM (what `splitserve serve attention` runs)."""
    from kvstore.config import Membership
    from rpc.server import run_until_signal
    from services.attention import AttentionServer
    from services.config import AttentionConfig
    from services.engine.config import EngineConfig

    config = AttentionConfig(
        name="bench", model=Path(model_dir), cluster=Membership(redis_url=redis_url, namespace=ns),
        engine=EngineConfig(num_kv_blocks=int(num_blocks), block_size=BS, device=device,
                            dtype=dtype),
    )  # fmt: skip
    server = AttentionServer(config)
    asyncio.run(run_until_signal(server.start, server.stop, lambda a: print(a, flush=True)))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: under a minute on 2 cores")
    ap.add_argument("--gpu", action="store_true", help="the split-decode part on cuda:0")
    ap.add_argument("--model", type=Path, help="model dir (default: a tiny preset, or llama-8b)")
    ap.add_argument("--seqs", type=int)
    ap.add_argument("--context", type=int)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    from kvstore.redis_server import EmbeddedRedis
    from services.engine.config import ModelConfig
    from services.model_prep.presets import make_model

    tmp = Path(tempfile.mkdtemp(prefix="distattn-"))
    results, summary = [], {}
    with EmbeddedRedis() as redis:
        if args.gpu:
            model = args.model or make_model(
                "llama-8b", tmp / "llama-8b", dtype="bfloat16", write_weights=False
            )  # random weights drawn on the GPU (load_format dummy)
            r = split_decode(model, redis.url, args.seqs or 16, args.context or 32768,
                             args.steps, "cuda:0", "bfloat16")  # fmt: skip
            results.append({"part": "split_decode", **r})
            summary = {"gpu_local_tpot_ms": r["local_tpot_ms"],
                       "gpu_split_tpot_ms": r["split_tpot_ms"],
                       "gpu_split_throughput_ratio": r["split_throughput_ratio"]}  # fmt: skip
        else:
            model = args.model or make_model("tiny", tmp / "tiny", seed=0)
            ref = _Reference(model, ModelConfig.from_dir(model).vocab_size)
            per_holder = 16 if args.quick else 32  # 4 x 32 blocks: the tiny model's 2048
            lengths = {}
            for holders in (1, 2, 4):
                r = longest_context(model, redis.url, holders, per_holder, ref)
                results.append({"part": "longest_context", **r})
                lengths[holders] = r["longest_context"]
                print(r, flush=True)
            summary = {f"context_tokens_{n}": lengths[n] for n in (1, 2, 4)}
            for n in (2, 4):
                summary[f"context_ratio_{n}"] = round(lengths[n] / max(1, lengths[1]), 3)
            seqs = args.seqs or (4 if args.quick else 8)
            context = args.context or (512 if args.quick else 2048)
            r = split_decode(model, redis.url, seqs, context, args.steps, "cpu", "float32")
            results.append({"part": "split_decode", **r})
            summary.update({"cpu_local_tpot_ms": r["local_tpot_ms"],
                            "cpu_split_tpot_ms": r["split_tpot_ms"],
                            "cpu_split_throughput_ratio": r["split_throughput_ratio"]})  # fmt: skip
        print(results[-1], flush=True)
    print("summary:", summary)
    write_report(args.json, "distattention", argv, results, summary)
    return summary


if __name__ == "__main__":
    main()
