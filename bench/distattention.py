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
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run as a script, bench/ comes first on the path and bench/kvstore.py would shadow kvstore/.
sys.path[:] = [str(ROOT), *(p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench")]

from bench.report import write_report  # noqa: E402

BS = 16


class _Loop:
    """An event loop on a thread, hosting in-process attention replicas."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def run(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


def _decoder(model_dir: Path, redis_url: str, ns: str, num_blocks: int, borrow: bool, **cfg):
    """An engine of num_blocks blocks; borrow: it borrows from the ledger's creditors."""
    from kvstore.lending import Ledger
    from services.attention_client import AttentionPeers
    from services.engine.config import EngineConfig
    from services.engine.engine import LLMEngine

    e = LLMEngine(model_dir, EngineConfig(num_kv_blocks=num_blocks, block_size=BS, **cfg))
    if not borrow:
        return e, None
    peers = AttentionPeers.for_engine(e, Ledger(redis_url, ns), f"bench-{uuid.uuid4().hex[:6]}")
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
    engine, peers = _decoder(  # one holder: the local pool alone
        model_dir, redis_url, ns, per_holder, holders > 1, max_num_batched_tokens=256
    )
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
        if peers is not None:
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


class _Timed:
    """A RemoteKV that times the decoder's side of each layer batch: sending (the device to
    host copy and encoding) and waiting for the partial (the round trip less what overlapped
    with the local partial)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.send_s = self.wait_s = 0.0
        self.batches = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def begin_step(self, holder_id, slices):
        t0 = time.perf_counter()
        self.inner.begin_step(holder_id, slices)
        self.send_s += time.perf_counter() - t0

    def send_layer(self, holder_id, layer, q, k, v):
        return self._timed(self.inner.send_layer, holder_id, layer, q, k, v)

    def send_ready(self, holder_id, layer, num_q, num_kv):
        return self._timed(self.inner.send_ready, holder_id, layer, num_q, num_kv)

    def _timed(self, send, *args):
        t0 = time.perf_counter()
        pending = send(*args)
        self.send_s += time.perf_counter() - t0
        self.batches += 1
        timed = self

        class _Wait:
            def result(self):
                t1 = time.perf_counter()
                try:
                    return pending.result()
                finally:
                    timed.wait_s += time.perf_counter() - t1

        return _Wait()


def split_decode(
    model_dir: Path,
    redis_url: str,
    seqs: int,
    context: int,
    steps: int,
    device: str,
    dtype: str,
    only: list[str] | None = None,
) -> dict:
    """Decode steps of `seqs` sequences of `context` tokens: all local; then each split in
    half between the local pool and one attention replica, in its own process (the deployed
    shape) and in this process on another thread (one CUDA context: no time-slicing between
    processes on the GPU)."""
    import numpy as np
    import torch

    from kvstore.lending import Ledger
    from services.attention import spawn
    from services.attention_client import AttentionPeers
    from services.engine.config import EngineConfig
    from services.engine.engine import LLMEngine
    from services.engine.sampling_params import SamplingParams
    from services.engine.sched_output import NewRequestData, ScheduledSeq, SchedulerOutput

    blocks_per_seq = -(-(context + steps) // BS)
    half = blocks_per_seq // 2
    lent = seqs * (blocks_per_seq - half) + 8
    ns_proc, ns_thread = f"bench{uuid.uuid4().hex[:8]}", f"bench{uuid.uuid4().hex[:8]}"
    # On a CPU the replica and the decoder share the cores: half each while split (torch's
    # spinning threads slow everything down when two processes each take all of them).
    threads = torch.get_num_threads()
    split_threads = max(1, threads // 2) if device == "cpu" else threads
    proc = spawn(
        model_dir,
        redis_url,
        ns_proc,
        lent,
        block_size=BS,
        device=device,
        dtype=dtype,
        cpu_threads=max(1, threads - split_threads) if device == "cpu" else 0,
    )
    lt = _Loop()
    thread_replica = None
    try:
        engine = LLMEngine(
            model_dir,
            EngineConfig(
                num_kv_blocks=seqs * blocks_per_seq + 8, block_size=BS, device=device,
                dtype=dtype, load_format="dummy" if device != "cpu" else "auto",
                max_num_seqs=max(seqs, 1), max_model_len=context + steps + BS,
            ),
        )  # fmt: skip
        runner = engine.runner
        params = SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True)
        vocab = engine.vocab_size
        rng = np.random.default_rng(0)
        results = {}
        graphs = getattr(runner, "_graphs", None)
        modes = ("local", "local_eager", "split_process", "split_process_layer_batches",
                 "split_process_host_wait", "split_process_eager", "split_thread")  # fmt: skip
        if not graphs:
            modes = ("local", "split_process", "split_thread")
        for mode in [m for m in modes if not only or m in only or m == "local"]:
            peers = None
            # *_eager: the same step without CUDA graphs (op by op).
            if graphs:
                runner._graphs = {} if mode == "local_eager" else graphs
                runner.use_cuda_graphs = mode != "split_process_eager"
            if mode == "split_thread" and proc.poll() is None:
                proc.terminate()  # its pool's memory goes back before the next one's is taken
                proc.wait(timeout=60)
                thread_replica = _replica(lt, model_dir, redis_url, ns_thread, lent,
                                          device=device, dtype=dtype)  # fmt: skip
            torch.set_num_threads(threads if mode.startswith("local") else split_threads)
            if not mode.startswith("local"):
                ns = ns_thread if mode == "split_thread" else ns_proc
                peers = AttentionPeers.for_engine(engine, Ledger(redis_url, ns), f"bench-{mode}")
                peers.host_wait = mode == "split_process_host_wait"
                # The default reads a lender on this GPU in place; the others attend through
                # layer batches, as across devices.
                peers.in_place_ok = mode == "split_process"
                timed = _Timed(peers)
                engine.attach_remote_kv(timed)
            so = SchedulerOutput()
            rids, held = [], []
            for i in range(seqs):
                rid = f"{mode}-{i}"
                blocks = engine.pool.allocate(blocks_per_seq)
                remote = []
                if peers is not None:
                    seg = peers.borrow(rid, half, blocks_per_seq - half)
                    deadline = time.monotonic() + 60
                    while seg is None and time.monotonic() < deadline:
                        time.sleep(0.2)  # the last mode's borrower is still being let go
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
            times, sends, waits = [], [], []
            graph_steps0 = getattr(runner, "dist_graph_steps", 0)
            for step in range(steps):
                if step:
                    so = SchedulerOutput(
                        decodes=[ScheduledSeq(r, context - 1 + step, 1, [], True) for r in rids]
                    )
                if peers is not None:
                    timed.send_s = timed.wait_s = 0.0
                if device != "cpu":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                runner.run(so)
                if device != "cpu":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
                if peers is not None:
                    sends.append(timed.send_s)
                    waits.append(timed.wait_s)
                    if step == 0:  # the first step compiles kernels: leave it out
                        work0 = _replica_work(proc, thread_replica)
            warm = slice(1, None) if len(times) > 2 else slice(None)
            r = {
                "tpot_ms": _ms(np.median(times[warm])),
                "steps_ms": [_ms(t) for t in times],
            }
            if peers is not None:
                r["graph_steps"] = getattr(runner, "dist_graph_steps", 0) - graph_steps0
                r["send_ms"] = _ms(np.median(sends[warm]))  # D2H copies + encoding, per step
                r["wait_ms"] = _ms(np.median(waits[warm]))  # past the local partial, per step
                r["round_trips_per_step"] = timed.batches // steps
                work = _replica_work(proc, thread_replica)
                r["replica_layer_ms"] = _ms(
                    (work[0] - work0[0]) / max(1, work[1] - work0[1])
                )  # per layer batch, on the replica: decode, store, attend, hand back
            results[mode] = r
            runner.requests.update(SchedulerOutput(finished_ids=rids))
            for rid, blocks in zip(rids, held, strict=True):
                if peers is not None:
                    peers.release(rid)
                engine.pool.release(blocks)
            if peers is not None:
                peers.close()
                peers.ledger.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if thread_replica is not None:
            lt.run(thread_replica.stop(drain_s=0.5))
    local = results["local"]["tpot_ms"]
    torch.set_num_threads(threads)
    out = {"seqs": seqs, "context": context, "device": device, "dtype": dtype,
           "local_tpot_ms": local, "threads": threads, "split_threads": split_threads}  # fmt: skip
    if "local_eager" in results:
        out["local_eager_tpot_ms"] = results["local_eager"]["tpot_ms"]
    for mode in ("split_process", "split_process_layer_batches", "split_process_host_wait",
                 "split_process_eager", "split_thread"):  # fmt: skip
        r = results.get(mode)
        if r is None:
            continue
        out[f"{mode}_tpot_ms"] = r["tpot_ms"]
        out[f"{mode}_throughput_ratio"] = round(local / r["tpot_ms"], 3)
    out["modes"] = results
    return out


def _ms(seconds: float) -> float:
    return round(1e3 * float(seconds), 3)


def _replica_work(proc, thread_replica) -> tuple[float, int]:
    """(seconds spent on layer batches, layer batches) of the replica so far (its Stats)."""
    if thread_replica is not None:
        return thread_replica.layer_seconds, thread_replica.layer_batches
    import grpc

    from protos.splitserve.v1 import attention_pb2 as pb
    from protos.splitserve.v1 import attention_pb2_grpc as pb_grpc

    with grpc.insecure_channel(proc.address) as ch:
        st = pb_grpc.AttentionStub(ch).Stats(pb.AttentionStatsRequest(), timeout=30)
    return st.layer_seconds, st.layer_batches


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: under a minute on 2 cores")
    ap.add_argument("--gpu", action="store_true", help="the split-decode part on cuda:0")
    ap.add_argument("--model", type=Path, help="model dir (default: a tiny preset, or llama-8b)")
    ap.add_argument("--seqs", type=int)
    ap.add_argument("--context", type=int)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--modes", nargs="*", help="split-decode modes to run (default: all)")
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
                             args.steps, "cuda:0", "bfloat16", args.modes)  # fmt: skip
            results.append({"part": "split_decode", **r})
            summary = {
                "gpu_local_tpot_ms": r["local_tpot_ms"],
                "gpu_split_tpot_ms": r["split_process_tpot_ms"],
                "gpu_split_throughput_ratio": r["split_process_throughput_ratio"],
            }
            optional = {
                "split_thread": "one_context", "split_process_layer_batches": "layer_batches",
                "split_process_host_wait": "host_wait", "split_process_eager": "eager",
            }  # fmt: skip
            for mode, key in optional.items():
                if f"{mode}_throughput_ratio" in r:
                    summary[f"gpu_split_{key}_throughput_ratio"] = r[f"{mode}_throughput_ratio"]
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
            summary.update(
                {
                    "cpu_local_tpot_ms": r["local_tpot_ms"],
                    "cpu_split_tpot_ms": r["split_process_tpot_ms"],
                    "cpu_split_throughput_ratio": r["split_process_throughput_ratio"],
                }
            )
        print(results[-1], flush=True)
    print("summary:", summary)
    write_report(args.json, "distattention", argv, results, summary)
    return summary


if __name__ == "__main__":
    main()
