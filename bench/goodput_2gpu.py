"""DistServe's goodput on two GPUs: colocated (one replica per GPU) against disaggregated
(prefill on GPU 0, decode on GPU 1), llama-8b preset (random bf16 weights), Azure conversation
trace excerpt replayed open-loop at increasing rates, goodput found by bisection.

    python bench/goodput_2gpu.py [--json PATH] [--gpus 2|1] [--budget-s 420]
    python bench/goodput_2gpu.py --cpu-smoke   # the tiny preset on CPU: checks the plumbing

Each server is its own process (`--serve ROLE`, on its own GPU of the two it sees) with the
gRPC services of services/prefill.py and services/decode.py and a private valkey for the KV
index. All four servers start at once (two per GPU, each with a fixed KV cache) and stay idle
while the other configuration is measured. Colocated requests go to the replica with the
fewest in flight; disaggregated ones through PDClient (prefill, then decode pulling the blocks
from the prefill's device pool through CUDA IPC, GPU to GPU: kvstore.device_pool and
kvstore.cuda_ipc; `--device-pool-gib 0` measures the host path instead). With --gpus 1 every
server shares GPU 0: a stand-in, not the two-GPU result.

SLO: TTFT <= 1 s and TPOT <= 50 ms, both met by >= 90% of a run's requests. 50 ms/token is
20 tokens/s, well above reading speed, and about 5x the engine's unloaded llama-8b decode step
on an H100/H200; 1 s to the first token of a ~1k-token conversation prompt is a chat bound and
about 10x its unloaded prefill. Goodput = the highest rate (req/s) meeting that, by bisection
(loadgen.goodput.search, one run per probe). Output lengths are capped at 512 tokens (2% of
the excerpt's requests are longer) so a probe drains in bounded time.

It also times the KV hand-off: a raw GPU0->GPU1 copy, the same bytes through a CUDA IPC handle
opened by a second process (what kvstore.cuda_ipc does), and the host path (device -> host
bytes -> device), for one request's KV at the trace's mean prompt length.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.kv_handoff_gpu import kv_handoff
from bench.report import machine, write_report
from loadgen.goodput import search
from loadgen.metrics import SLO, summarize
from loadgen.outcome import Outcome
from loadgen.prompts import Prompt
from loadgen.readers import read_trace
from loadgen.replay import replay
from loadgen.workload import Planned, ReplayConfig, plan

TRACE = Path(__file__).resolve().parents[1] / "loadgen/traces/azure_conv_2023_head1000.csv"
perf = time.perf_counter


# -- a server process -------------------------------------------------------------------------


def serve(args) -> None:
    """One prefill/decode/colocated server on this process's (only) device; prints its
    address, serves until SIGTERM."""
    from kvstore.config import Membership
    from rpc.server import run_until_signal
    from services.config import DecodeConfig, PrefillConfig
    from services.engine.config import EngineConfig
    from services.engine.engine import LLMEngine

    cuda = args.device.startswith("cuda")
    if cuda:
        import torch

        # Both GPUs are visible to every server (a CUDA IPC handle opens only on a visible
        # device); each server works on its own.
        torch.cuda.set_device(args.device)
    cfg = EngineConfig(
        device=args.device,
        dtype="bfloat16" if cuda else "float32",
        load_format="dummy" if cuda else "auto",
        num_kv_blocks=args.kv_blocks,
        max_num_seqs=args.max_seqs,
        max_num_batched_tokens=args.batched_tokens,
        max_model_len=8192 if cuda else None,
    )
    engine = LLMEngine(args.model, cfg, seed=0)
    common = {
        "name": "bench",
        "model": Path(args.model),
        "engine": cfg,
        "cluster": Membership(redis_url=args.redis, namespace=args.namespace),
        "max_waiting": 4096,
    }
    if args.serve == "prefill":
        from services.prefill import PrefillServer

        server = PrefillServer(
            PrefillConfig(
                **common,
                kv_memory_bytes=args.kv_store_gib << 30,
                device_pool_bytes=int(args.device_pool_gib * 2**30),
            ),
            engine,
        )
    else:
        from services.decode import DecodeServer

        server = DecodeServer(DecodeConfig(**common, colocated=args.serve == "colocated"), engine)
    asyncio.run(run_until_signal(server.start, server.stop, lambda a: print(a, flush=True)))


def spawn(role: str, gpu: int | None, model: Path, redis: str, ns: str, opts) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--serve", role, "--model", str(model), "--redis", redis,
           "--namespace", ns, "--kv-blocks", str(opts.kv_blocks), "--max-seqs",
           str(opts.max_seqs), "--batched-tokens",
           str(_budget(role, opts)),
           "--device",
           "cpu" if gpu is None else f"cuda:{gpu}", "--device-pool-gib",
           str(opts.device_pool_gib)]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NCCL_NVLS_ENABLE": "0"}
    if gpu is None:
        env["OMP_NUM_THREADS"] = "1"
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)


def _budget(role: str, opts) -> int:
    """Tokens a step for this role's engine (prefill and colocated may differ from decode)."""
    if role == "prefill":
        return opts.prefill_batched_tokens
    if role == "colocated":
        return opts.colocated_batched_tokens or opts.batched_tokens
    return opts.batched_tokens


def address_of(proc: subprocess.Popen, role: str) -> str:
    addr = proc.stdout.readline().strip() if proc.stdout else ""
    if not addr:
        raise RuntimeError(f"{role} server did not start (exit {proc.poll()})")
    return addr


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()


# -- the replay client ------------------------------------------------------------------------


class PDReplayClient:
    """loadgen's Client over PDClient: colocated (several replicas, fewest in flight first) or
    disaggregated (one prefill + one decode). Keeps each request's server-side timings."""

    def __init__(self, mode: str, addrs: list[str] | tuple[str, str], max_tokens_cap: int):
        from router.pd_client import PDClient

        if mode == "colocated":
            self.clients = [PDClient(decode=a, timeout_s=120) for a in addrs]
        else:
            pre, dec = addrs
            self.clients = [PDClient(decode=dec, prefill=pre, timeout_s=120)]
        self.inflight = [0] * len(self.clients)
        self.rr = 0
        self.tasks: set[asyncio.Task] = set()
        self.timings: dict[int, dict] = {}
        self.cap = max_tokens_cap

    async def open(self, connections: int) -> None:
        pass

    def submit(self, p, out: Outcome, done) -> None:
        task = asyncio.get_running_loop().create_task(self._run(p, out, done))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _pick(self) -> int:
        n = len(self.clients)
        self.rr = (self.rr + 1) % n
        return min(((self.rr + k) % n for k in range(n)), key=lambda i: self.inflight[i])

    async def _run(self, p, out: Outcome, done) -> None:
        import grpc

        from services.engine.sampling_params import SamplingParams

        k = self._pick()
        self.inflight[k] += 1
        params = SamplingParams(max_tokens=p.max_tokens, temperature=0.0, ignore_eos=True)
        tm: dict = {}
        out.sent = perf()
        try:
            async for piece in self.clients[k].generate(list(p.prompt.ids), params):
                now = perf()
                if piece.token_ids:
                    out.piece(now, len(piece.token_ids))
                if piece.prefill_timings is not None and "prefill_ms" not in tm:
                    t = piece.prefill_timings
                    tm.update(queue_ms=t.queue_ms, prefill_ms=t.prefill_ms, publish_ms=t.publish_ms)
                if piece.decode_timings is not None:
                    t = piece.decode_timings
                    tm.update(transfer_ms=t.transfer_ms, admission_ms=t.admission_ms,
                              bytes_pulled=t.bytes_pulled)  # fmt: skip
                out.end = now
            if not out.chunk_times:
                out.error = "the stream ended without tokens"
        except grpc.aio.AioRpcError as e:
            out.error = f"{e.code().name}: {e.details()}"
        except asyncio.CancelledError:
            out.error = "cancelled"
            raise
        except Exception as e:
            out.error = f"{type(e).__name__}: {e}"
        finally:
            self.inflight[k] -= 1
            self.timings[p.index] = tm
            done(out)

    async def close(self) -> None:
        for t in list(self.tasks):
            t.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)

    async def shutdown(self) -> None:
        for c in self.clients:
            await c.close()


class IdPrompts:
    """Random token-id prompts of the planned length (random weights: content is immaterial)."""

    def __init__(self, vocab: int, seed: int = 0) -> None:
        self.vocab, self.seed = vocab, seed

    def build(self, index: int, num_tokens: int, hash_ids=()) -> Prompt:
        rng = np.random.default_rng([self.seed, index])
        ids = rng.integers(5, self.vocab, num_tokens).tolist()
        return Prompt(ids=tuple(ids), num_tokens=num_tokens)


# -- one configuration's goodput --------------------------------------------------------------


async def goodput(mode, addrs, trace, prompts, slo, opts, deadline) -> dict:
    client = PDReplayClient(mode, addrs, opts.max_output)
    # Warm-up: every prompt-length bucket once per replica, so compiles happen here.
    warm_lens = [64, 512, 1024, 2048, 4096]
    for rep in range(len(client.clients)):
        for i, n in enumerate(warm_lens):
            pl = Planned(10_000 + rep * 10 + i, 0.0, prompts.build(10_000 + i, n), 8, "w", "", True)
            client.rr = rep - 1
            await replay([pl], client, spin_s=0, drain_timeout_s=120)

    probes_out: list[dict] = []

    async def measure(rate: float, repeat: int) -> dict:
        if perf() > deadline:  # out of time: count as a miss so the search stops climbing
            s = {"attainment": {"both": 0.0}, "skipped": "time budget spent"}
            probes_out.append({"rate": rate, "skipped": True})
            return s
        cfg = ReplayConfig(
            rate=rate, duration_s=opts.probe_s, max_requests=opts.probe_requests,
            warmup_s=opts.warmup_s, max_output_tokens=opts.max_output,
            max_prompt_tokens=8192 - opts.max_output - 8, seed=repeat,
        )  # fmt: skip
        # Fresh prompts for every probe: a repeated prompt would hit the prefix caches (and
        # skip the KV transfer) filled by earlier probes.
        prompts.seed += 1
        planned = plan(trace, cfg, prompts)
        client.timings.clear()
        res = await replay(planned, client, spin_s=0, drain_timeout_s=opts.drain_s)
        s = summarize(res.outcomes, slo)
        tms = [client.timings.get(o.index, {}) for o in res.outcomes if not o.warmup and o.ok]
        ttft = s["ttft_s"]["mean"] or float("nan")

        def mean(key):
            v = [t[key] for t in tms if key in t]
            return float(np.mean(v)) if v else None

        split = {k: mean(k) for k in ("queue_ms", "prefill_ms", "publish_ms", "transfer_ms",
                                      "admission_ms", "bytes_pulled")}  # fmt: skip
        tr = split["transfer_ms"]
        split["transfer_share_of_ttft"] = tr / (ttft * 1e3) if tr is not None and ttft else None
        row = {
            "rate": rate, "requests": s["measured"], "completed": s["completed"],
            "attainment": s["attainment"], "ttft_p50_s": s["ttft_s"]["p50"],
            "ttft_p90_s": s["ttft_s"]["p90"], "tpot_p50_s": s["tpot_s"]["p50"],
            "tpot_p90_s": s["tpot_s"]["p90"],
            "output_tok_s": s["throughput"]["output_tokens_per_s"],
            "send_lag_p99_s": s["send_lag_s"]["p99"], "errors": s["errors"], "server_split": split,
        }  # fmt: skip
        probes_out.append(row)
        a = s["attainment"]
        print(f"  {mode:>13} {rate:6.2f} req/s: both {a['both']:.2f} (TTFT {a['ttft']:.2f}, "
              f"TPOT {a['tpot']:.2f})  TTFT p90 {row['ttft_p90_s'] or float('nan'):.3f} s  "
              f"TPOT p90 {(row['tpot_p90_s'] or float('nan')) * 1e3:.1f} ms  "
              f"transfer {tr if tr is not None else float('nan'):.1f} ms  n={s['measured']}",
              flush=True)  # fmt: skip
        return s

    try:
        # One discarded probe at the lowest rate first: the first loaded run of a fresh server
        # captures CUDA graphs for new batch sizes and grows its allocator (seen failing at a
        # rate that passed on the next probe).
        await measure(opts.lo, 99)
        probes_out[-1]["discarded_warmup"] = True
        res = await search(measure, slo.attainment, opts.lo, opts.hi, repeats=1,
                           rel_tol=opts.rel_tol, max_probes=opts.max_probes)  # fmt: skip
    finally:
        await client.shutdown()
    return {"mode": mode, "goodput_rps": res.goodput_rps, "bracket": list(res.bracket),
            "converged": res.converged, "probes": probes_out}  # fmt: skip


# -- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--gpus", type=int, default=2, choices=(1, 2))
    ap.add_argument("--cpu-smoke", action="store_true")
    ap.add_argument("--budget-s", type=float, default=420, help="whole run, start-up included")
    ap.add_argument("--ttft-s", type=float, default=1.0)
    ap.add_argument("--tpot-ms", type=float, default=50.0)
    ap.add_argument("--lo", type=float, default=4.0)
    ap.add_argument("--hi", type=float, default=8.0)
    ap.add_argument("--rel-tol", type=float, default=0.1)
    ap.add_argument("--max-probes", type=int, default=7)
    ap.add_argument("--probe-s", type=float, default=12.0, help="arrival span of one probe")
    ap.add_argument("--probe-requests", type=int, default=240)
    ap.add_argument("--warmup-s", type=float, default=1.5)
    ap.add_argument("--drain-s", type=float, default=20.0)
    ap.add_argument("--max-output", type=int, default=512)
    ap.add_argument("--skip-handoff", action="store_true")
    # server-process options
    ap.add_argument("--serve", choices=("prefill", "decode", "colocated"))
    ap.add_argument("--model", type=Path)
    ap.add_argument("--redis")
    ap.add_argument("--namespace", default="g2")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--kv-blocks", type=int, default=0)
    ap.add_argument("--max-seqs", type=int, default=128)
    ap.add_argument("--batched-tokens", type=int, default=2048)
    # A prefill-only server has no decode steps to protect, so it can take whole prompts a step
    # (DistServe's point: each phase gets its own configuration).
    ap.add_argument("--prefill-batched-tokens", type=int, default=8192)
    # Colocated with whole prompts a step (no chunking): the baseline DistServe measured against,
    # where a prompt's prefill stalls every running decode.
    ap.add_argument("--colocated-batched-tokens", type=int, default=0, help="0: --batched-tokens")
    ap.add_argument("--modes", default="colocated,disaggregated")
    ap.add_argument("--kv-store-gib", type=int, default=8)
    ap.add_argument("--device-pool-gib", type=float, default=2.0,
                    help="prefill's GPU hand-off pool; 0: the host path")  # fmt: skip
    args = ap.parse_args(argv)
    if args.serve:
        args.kv_blocks = args.kv_blocks or None
        serve(args)
        return 0

    t_start = perf()
    from kvstore.redis_server import EmbeddedRedis
    from services.engine.config import ModelConfig
    from services.model_prep.presets import make_model

    preset = "tiny" if args.cpu_smoke else "llama-8b"
    gpu_line = "cpu smoke"
    if not args.cpu_smoke:
        import torch

        n = torch.cuda.device_count()
        if n < args.gpus:
            raise SystemExit(f"--gpus {args.gpus} but {n} GPU(s) visible")
        total = torch.cuda.get_device_properties(0).total_memory
        gpu_line = f"{n} x {torch.cuda.get_device_name(0)} ({total / 2**30:.0f} GiB)"
        # Two servers per GPU at once: each gets ~38% of the card less 16 GiB of weights (and
        # with --gpus 1 four share one card). 2 MiB a block (16 tokens x 128 KiB).
        per = 0.38 if args.gpus == 2 else 0.19
        args.kv_blocks = args.kv_blocks or max(
            512, min(12000, int((per * total - 19 * 2**30) / 2**21))
        )
    else:
        args.kv_blocks = args.kv_blocks or 2048
        args.max_seqs, args.batched_tokens, args.prefill_batched_tokens = 32, 512, 512
        args.lo, args.hi, args.probe_s, args.probe_requests = 0.5, 1.0, 4.0, 8
        args.max_output, args.max_probes, args.warmup_s, args.drain_s = 8, 3, 0.0, 60
    print(f"machine: {machine(gpu_line)}", flush=True)
    slo = SLO(args.ttft_s, args.tpot_ms / 1e3, 0.9)
    print(f"SLO: TTFT <= {slo.ttft_s} s and TPOT <= {slo.tpot_s * 1e3:.0f} ms for >= 90% of "
          "requests (TPOT 50 ms = 20 tok/s, > reading speed, ~5x an unloaded 8B decode step; "
          "TTFT 1 s: a chat bound, ~10x an unloaded ~1k-token prefill)", flush=True)  # fmt: skip
    trace = read_trace(TRACE)
    deadline = t_start + args.budget_s
    results: list[dict] = []
    summary: dict = {"slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s, "attainment": 0.9},
                     "gpus": args.gpus, "device": gpu_line, "preset": preset,
                     "trace": TRACE.name,
                     "handoff": "host" if args.cpu_smoke or not args.device_pool_gib else "ipc",
                     "batched_tokens": {"prefill": args.prefill_batched_tokens,
                                        "decode": args.batched_tokens,
                                        "colocated": _budget("colocated", args)}}  # fmt: skip
    if args.gpus == 1:
        summary["note"] = "ONE-GPU STAND-IN: every server shares GPU 0; not the two-GPU result"

    def save():
        write_report(args.json, "goodput_2gpu", argv, results, summary)

    if not args.cpu_smoke and not args.skip_handoff and args.gpus == 2:
        try:
            h = kv_handoff(2 * 32 * 8 * 128 * 2, 1014)
        except Exception as e:
            h = {"error": f"{type(e).__name__}: {e}"}
        print("kv hand-off:", json.dumps(h), flush=True)
        summary["kv_handoff"] = h
        save()

    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis() as redis:
        model = make_model(preset, Path(tmp) / preset, write_weights=args.cpu_smoke)
        vocab = ModelConfig.from_dir(model).vocab_size
        prompts = IdPrompts(vocab)
        if args.cpu_smoke:
            tiny = read_trace(TRACE)
            from loadgen.trace import Trace, TraceRequest

            short = [
                TraceRequest(r.arrival_s, max(4, r.prompt_tokens // 40), r.output_tokens)
                for r in tiny.requests
            ]
            trace = Trace(tiny.name, short)
        g = (lambda i: None) if args.cpu_smoke else (lambda i: i % args.gpus)
        modes = args.modes.split(",")
        procs = {}
        if "colocated" in modes:
            procs["colocated0"] = spawn("colocated", g(0), model, redis.url, "c", args)
            if args.gpus == 2:
                procs["colocated1"] = spawn("colocated", g(1), model, redis.url, "c", args)
        if "disaggregated" in modes:
            procs["prefill"] = spawn("prefill", g(0), model, redis.url, "d", args)
            procs["decode"] = spawn("decode", g(1), model, redis.url, "d", args)
        try:
            addrs = {k: address_of(p, k) for k, p in procs.items()}
            print(f"servers up in {perf() - t_start:.0f} s: {addrs}", flush=True)
            remaining = deadline - perf()
            plans = []
            if "colocated" in modes:
                plans.append(
                    ("colocated", [a for k, a in addrs.items() if k.startswith("colocated")])
                )
            if "disaggregated" in modes:
                plans.append(("disaggregated", (addrs["prefill"], addrs["decode"])))
            for i, (mode, a) in enumerate(plans):
                # Each configuration gets its share of what is left.
                t_mode = perf() + remaining / len(plans) if i == 0 else deadline
                r = asyncio.run(goodput(mode, a, trace, prompts, slo, args, t_mode))
                results.append(r)
                summary[f"{mode}_goodput_rps"] = r["goodput_rps"]
                summary[f"{mode}_converged"] = r["converged"]
                print(f"{mode}: goodput {r['goodput_rps']:.2f} req/s (bracket {r['bracket']}, "
                      f"converged {r['converged']})", flush=True)  # fmt: skip
                save()
        finally:
            for p in procs.values():
                stop(p)
    c, d = summary.get("colocated_goodput_rps"), summary.get("disaggregated_goodput_rps")
    summary["ratio_disagg_over_colocated"] = d / c if c and d is not None else None
    summary["wall_s"] = perf() - t_start
    print("summary:", json.dumps(summary), flush=True)
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
