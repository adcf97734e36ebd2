"""The GPU part of bench/offload.py: batch and decode throughput at a fixed model-worker budget.

The colocated engine gets the model worker's KV budget as its pool: its largest batch of
`context`-token sequences is what that pool holds, measured with CUDA graphs. The offload model
worker holds no KV; its attention worker (its own process and CUDA context on the same GPU)
holds a growing batch's KV, and the largest batch whose TPOT stays under the limit counts.
Steps are driven through the runners directly (SchedulerOutputs of decodes over contexts
taken as computed), so a long prefill does not eat the device time: the timing of a decode
step does not depend on what the cached K/V holds.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

BS = 16


def _decode_steps(runner, pool, prefix: str, seqs: int, context: int, steps: int, vocab: int):
    """Decode `steps` steps of `seqs` sequences of `context` tokens; returns per-step seconds."""
    import numpy as np

    from services.engine.sampling_params import SamplingParams
    from services.engine.sched_output import NewRequestData, ScheduledSeq, SchedulerOutput

    rng = np.random.default_rng(0)
    params = SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True)
    per_seq = -(-(context + steps) // BS)
    so = SchedulerOutput()
    rids, held = [], []
    for i in range(seqs):
        rid = f"{prefix}-{i}"
        blocks = pool.allocate(per_seq)
        held.append(blocks)
        prompt = rng.integers(0, vocab, context).tolist()
        so.new_requests.append(NewRequestData(rid, prompt, [], params, blocks, context - 1))
        so.decodes.append(ScheduledSeq(rid, context - 1, 1, [], True))
        rids.append(rid)
    times = []
    for step in range(steps):
        if step:
            so = SchedulerOutput(
                decodes=[ScheduledSeq(r, context - 1 + step, 1, [], True) for r in rids]
            )
        _sync()
        t0 = time.perf_counter()
        runner.run(so)
        _sync()
        times.append(time.perf_counter() - t0)
    runner.requests.update(SchedulerOutput(finished_ids=rids))
    for blocks in held:
        pool.release(blocks)
    return times


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _median_ms(times: list[float]) -> float:
    warm = sorted(times[1:] if len(times) > 2 else times)  # the first step compiles kernels
    return round(1e3 * warm[len(warm) // 2], 3)


def gpu_part(
    model: Path, redis_url: str, context: int, budget_gib: float, tpot_ms: float, steps: int,
    dev: str = "cuda:0", dtype: str = "bfloat16",
) -> dict:  # fmt: skip
    import torch

    from bench.offload import _model_worker, _worker_proc
    from services.engine.config import EngineConfig
    from services.engine.engine import LLMEngine
    from services.engine.kv_cache import KVCache

    name = torch.cuda.get_device_name(0) if dev.startswith("cuda") else "cpu"
    out: dict = {"context": context, "budget_gib": budget_gib, "tpot_limit_ms": tpot_ms,
                 "device": name}  # fmt: skip
    per_seq = -(-(context + steps) // BS)
    common = dict(device=dev, dtype=dtype, load_format="dummy" if dev != "cpu" else "auto",
                  max_model_len=context + steps + BS)  # fmt: skip

    # Colocated: the budget is its KV pool.
    probe = EngineConfig(num_kv_blocks=2, block_size=BS, **common)
    from services.engine.config import ModelConfig

    mcfg = ModelConfig.from_dir(model)
    per_block = KVCache.bytes_per_block(mcfg, BS, probe.resolve_dtype(mcfg))
    budget_blocks = int(budget_gib * 2**30) // per_block
    batch_col = budget_blocks // per_seq
    out["batch_colocated"] = batch_col
    e = LLMEngine(model, EngineConfig(num_kv_blocks=budget_blocks, max_num_seqs=batch_col,
                                      block_size=BS, max_graph_batch_size=batch_col,
                                      **common))  # fmt: skip
    times = _decode_steps(e.runner, e.pool, "col", batch_col, context, steps, e.vocab_size)
    out["colocated_tpot_ms"] = _median_ms(times)
    out["colocated_tokens_per_s"] = round(batch_col / (out["colocated_tpot_ms"] / 1e3), 1)
    print("colocated", out, flush=True)
    del e
    torch.cuda.empty_cache()

    # Offload: a batch ladder over one attention worker process on the same GPU.
    ladder = [batch_col * m for m in (1, 2, 4, 8, 16)]
    worker_blocks = ladder[-1] * per_seq + 8
    ns = f"bench{uuid.uuid4().hex[:8]}"
    proc = _worker_proc(model, redis_url, ns, worker_blocks, device=dev, dtype=dtype)
    runs = []
    try:
        e, w = _model_worker(
            model, redis_url, ns, worker_blocks, max_num_seqs=ladder[-1],
            max_num_batched_tokens=max(512, ladder[-1]), **common,
        )  # fmt: skip
        r = e.runner
        for batch in ladder:
            row = {"batch": batch}
            for mode, (pingpong, q_first) in {"plain": (False, False), "pingpong": (True, False),
                                              "both": (True, True)}.items():  # fmt: skip
                r.pingpong, r.q_first = pingpong, q_first
                c0 = dict(r.counters.__dict__)
                times = _decode_steps(r, e.pool, f"{mode}{batch}", batch, context, steps,
                                      e.vocab_size)  # fmt: skip
                c = r.counters
                step_s = c.step_seconds - c0["step_seconds"]
                row[f"{mode}_tpot_ms"] = _median_ms(times)
                row[f"{mode}_idle_fraction"] = round(
                    (c.wait_seconds - c0["wait_seconds"]) / step_s, 4
                ) if step_s else None  # fmt: skip
            best = min(row[f"{m}_tpot_ms"] for m in ("plain", "pingpong", "both"))
            row["tpot_ms"] = best
            row["tokens_per_s"] = round(batch / (best / 1e3), 1)
            runs.append(row)
            print("offload", row, flush=True)
            if best > tpot_ms:
                break
        w.close()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    out["offload_runs"] = runs
    ok = [x for x in runs if x["tpot_ms"] <= tpot_ms]
    top = max(ok, key=lambda x: x["tokens_per_s"]) if ok else min(runs, key=lambda x: x["tpot_ms"])
    out["batch_offload"] = top["batch"]
    out["batch_ratio_gpu"] = round(top["batch"] / max(1, batch_col), 3)
    out["throughput_ratio_gpu"] = round(top["tokens_per_s"] / out["colocated_tokens_per_s"], 3)
    out["tpot_ms_colocated_gpu"] = out["colocated_tpot_ms"]
    out["tpot_ms_offload_gpu"] = top["tpot_ms"]
    return out
