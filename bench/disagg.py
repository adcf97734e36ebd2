"""Disaggregated prefill/decode against the colocated baseline, on CPU, with the TTFT breakdown.

Servers run as separate processes (`splitserve serve prefill|decode|colocated`) on loopback with
a private valkey. Disaggregated: one prefill and one decode process, one torch thread each;
colocated: one process with two threads, so both use the same two cores.

For every request it records the client-side TTFT (the first token comes from prefill), TPOT
and end-to-end time, and the servers' own split: queueing, prefill compute, publishing the
blocks, KV transfer (decode pulling what it lacked) and decode admission. KV bytes moved per
request are compared with the theoretical 2 x layers x kv_heads x head_dim x dtype bytes x
prompt tokens.

    python bench/disagg.py [--quick] [--json PATH]

Summary keys: bytes_ratio_to_theoretical (all requests, both presets), transfer_share_of_ttft
(transfer time / TTFT for the 2k-token prompts on the small preset).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import machine, write_report
from kvstore.redis_server import EmbeddedRedis
from router.pd_client import PDClient
from services.engine.config import ModelConfig
from services.engine.sampling_params import SamplingParams
from services.model_prep.presets import make_model


@dataclass
class Row:
    preset: str
    scenario: str  # "mixed" (concurrent) | "2k" (one long prompt at a time)
    mode: str  # "disaggregated" | "colocated"
    requests: int
    prompt_tokens: int
    output_tokens: int
    wall_s: float
    output_tok_s: float
    ttft_mean_ms: float
    ttft_p90_ms: float
    tpot_mean_ms: float
    queue_ms: float  # means over requests of the servers' split
    prefill_ms: float
    publish_ms: float
    transfer_ms: float
    admission_ms: float
    kv_bytes_per_request: float
    kv_bytes_theoretical: float
    transfer_share_of_ttft: float


def spawn(role: str, model_dir: Path, redis_url: str | None, threads: int, ns: str):
    cmd = [sys.executable, "-m", "splitserve.cli", "serve", role, "--model", str(model_dir),
           "--namespace", ns, "--kv-memory", "2GiB", "--max-waiting", "1024"]  # fmt: skip
    if redis_url:
        cmd += ["--redis", redis_url]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    addr = proc.stdout.readline().strip() if proc.stdout else ""
    if not addr:
        proc.kill()
        raise RuntimeError(f"{role} did not start: {proc.stderr.read() if proc.stderr else ''}")
    return proc, addr


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


async def run_requests(client: PDClient, prompts, params, concurrent: bool) -> list[dict]:
    async def one(p):
        t0 = time.perf_counter()
        first = None
        n = 0
        pre = dec = usage = None
        async for piece in client.generate(p, params):
            if first is None:
                first = time.perf_counter()
            n += len(piece.token_ids)
            pre = pre or piece.prefill_timings
            dec = dec or piece.decode_timings
            usage = piece.usage or usage
        end = time.perf_counter()
        cached = usage.cached_tokens if usage is not None else 0
        return {"ttft": first - t0, "e2e": end - t0, "n": n, "pre": pre, "dec": dec,
                "cached": cached}  # fmt: skip

    if concurrent:
        return list(await asyncio.gather(*(one(p) for p in prompts)))
    return [await one(p) for p in prompts]


def summarize(preset, scenario, mode, prompts, results, wall, per_token_bytes) -> Row:
    ttft = [r["ttft"] * 1e3 for r in results]
    tpot = [(r["e2e"] - r["ttft"]) / max(1, r["n"] - 1) * 1e3 for r in results]

    def mean(f):
        return statistics.fmean(f(r) for r in results)

    pre = lambda r, k: getattr(r["pre"], k) if r["pre"] is not None else 0.0  # noqa: E731
    dec = lambda r, k: getattr(r["dec"], k) if r["dec"] is not None else 0.0  # noqa: E731
    # Colocated requests report their queueing on the decode side (no prefill service).
    queue = mean(lambda r: pre(r, "queue_ms") + (dec(r, "queue_ms") if r["pre"] is None else 0))
    colocated = all(r["pre"] is None for r in results)
    # Colocated: the decode side's "admission" is queueing plus computing the prompt.
    prefill = mean(
        lambda r: dec(r, "admission_ms") - dec(r, "queue_ms") if colocated else pre(r, "prefill_ms")
    )
    admission = 0.0 if colocated else mean(lambda r: dec(r, "admission_ms"))
    transfer = mean(lambda r: dec(r, "transfer_ms"))
    kv = mean(lambda r: dec(r, "bytes_pulled"))
    # What had to move: the prompt's KV less what the decode's prefix cache already held.
    theo = statistics.fmean(
        (len(p) - r["cached"]) * per_token_bytes for p, r in zip(prompts, results, strict=True)
    )
    out = sum(r["n"] for r in results)
    return Row(
        preset=preset, scenario=scenario, mode=mode, requests=len(prompts),
        prompt_tokens=sum(map(len, prompts)), output_tokens=out, wall_s=round(wall, 3),
        output_tok_s=round(out / wall, 2), ttft_mean_ms=round(statistics.fmean(ttft), 2),
        ttft_p90_ms=round(sorted(ttft)[int(0.9 * (len(ttft) - 1))], 2),
        tpot_mean_ms=round(statistics.fmean(tpot), 2), queue_ms=round(queue, 2),
        prefill_ms=round(prefill, 2),
        publish_ms=round(mean(lambda r: pre(r, "publish_ms")), 2),
        transfer_ms=round(transfer, 2),
        admission_ms=round(admission, 2),
        kv_bytes_per_request=round(kv, 1), kv_bytes_theoretical=round(theo, 1),
        transfer_share_of_ttft=round(transfer / statistics.fmean(ttft), 4),
    )  # fmt: skip


def prompts_for(vocab: int, lengths: list[int], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, vocab) for _ in range(n)] for n in lengths]


def bench_preset(preset, model_dir, redis_url, scenarios, seed) -> list[Row]:
    cfg = ModelConfig.from_dir(model_dir)
    per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4  # float32 on CPU
    rows = []
    for mode in ("colocated", "disaggregated"):
        ns = f"bench{os.getpid()}{mode[0]}{preset}"
        procs = []
        try:
            if mode == "colocated":
                p, addr = spawn("colocated", model_dir, None, 2, ns)
                procs.append(p)
                client_args = {"decode": addr}
            else:
                p, pre_addr = spawn("prefill", model_dir, redis_url, 1, ns)
                procs.append(p)
                d, dec_addr = spawn("decode", model_dir, redis_url, 1, ns)
                procs.append(d)
                client_args = {"decode": dec_addr, "prefill": pre_addr}

            async def go(client_args=client_args, mode=mode):
                out = []
                async with PDClient(**client_args) as c:
                    warm = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
                    await c.complete(prompts_for(cfg.vocab_size, [8], 99)[0], warm)
                    for name, lengths, max_tokens, concurrent in scenarios:
                        prompts = prompts_for(cfg.vocab_size, lengths, seed)
                        params = SamplingParams(
                            max_tokens=max_tokens, temperature=0.0, ignore_eos=True
                        )
                        t0 = time.perf_counter()
                        res = await run_requests(c, prompts, params, concurrent)
                        wall = time.perf_counter() - t0
                        out.append(summarize(preset, name, mode, prompts, res, wall, per_token))
                return out

            for r in asyncio.run(go()):
                rows.append(r)
                print(
                    f"{r.preset:>6} {r.scenario:>5} {r.mode:>13}: {r.output_tok_s:7.1f} tok/s  "
                    f"TTFT {r.ttft_mean_ms:8.1f} ms (queue {r.queue_ms:.1f}, prefill "
                    f"{r.prefill_ms:.1f}, publish {r.publish_ms:.1f})  transfer "
                    f"{r.transfer_ms:.1f} ms  admission {r.admission_ms:.1f} ms  TPOT "
                    f"{r.tpot_mean_ms:6.1f} ms  KV {r.kv_bytes_per_request / 1e6:.2f} MB "
                    f"(theory {r.kv_bytes_theoretical / 1e6:.2f})",
                    flush=True,
                )
        finally:
            for p in procs:
                stop(p)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="under 60 s on 2 cores")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    if args.quick:
        plan = {
            "tiny": [("mixed", [rng.randint(64, 512) for _ in range(16)], 16, True)],
            "small": [("2k", [2048], 4, False)],
        }
    else:
        plan = {
            "tiny": [("mixed", [rng.randint(64, 1024) for _ in range(32)], 32, True)],
            "small": [
                ("mixed", [rng.randint(64, 512) for _ in range(16)], 16, True),
                ("2k", [2048] * 3, 8, False),
            ],
        }
    print(f"machine: {machine()}", flush=True)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis() as redis_server:
        for preset, scenarios in plan.items():
            model_dir = make_model(preset, Path(tmp) / preset, seed=args.seed)
            rows += bench_preset(preset, model_dir, redis_server.url, scenarios, args.seed)
    dis = [r for r in rows if r.mode == "disaggregated"]
    long = [r for r in dis if r.preset == "small" and r.scenario == "2k"]
    summary = {
        "bytes_ratio_to_theoretical": round(
            sum(r.kv_bytes_per_request * r.requests for r in dis)
            / sum(r.kv_bytes_theoretical * r.requests for r in dis),
            4,
        ),
        "transfer_share_of_ttft": long[0].transfer_share_of_ttft if long else None,
    }
    for r in rows:
        summary[f"{r.preset}_{r.scenario}_{r.mode}_tok_s"] = r.output_tok_s
        summary[f"{r.preset}_{r.scenario}_{r.mode}_ttft_ms"] = r.ttft_mean_ms
    print("summary:", json.dumps(summary))
    write_report(args.json, "disagg", argv, [asdict(r) for r in rows], summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
