"""Engine throughput and latency against transformers `generate`, on the same model and prompts.

Two scenarios per model: one request alone, and N concurrent requests of mixed prompt lengths
(transformers runs them as one left-padded batch; the engine admits them together and batches them
continuously). Every request generates exactly `max_tokens` tokens (EOS ignored) so both sides do
the same work. Prompts are real text from the bundled corpus, cut to exact token counts.

    python bench/engine.py [--quick] [--json PATH] [--models smollm2,small]

The summary's ratio_single / ratio_concurrent are ours / transformers in output tokens per second
on SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import machine, write_report
from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.engine.sampling_params import SamplingParams
from services.model_prep.presets import make_model
from splitserve.models_pull import pull_model

CORPUS = Path(__file__).resolve().parents[1] / "services/model_prep/data/bpe_corpus.txt"


@dataclass
class Result:
    model: str
    scenario: str  # "single" | "concurrent"
    system: str  # "splitserve" | "transformers"
    requests: int
    prompt_tokens: int  # total over requests
    output_tokens: int  # total over requests
    wall_s: float
    output_tok_s: float
    ttft_mean_s: float
    ttft_p50_s: float
    tpot_mean_ms: float  # DistServe's: (e2e - ttft) / (out - 1), averaged over requests


def prompts_from_corpus(tokenizer, lengths: list[int], seed: int) -> list[list[int]]:
    ids = tokenizer.encode(CORPUS.read_text())
    rng = random.Random(seed)
    out = []
    for n in lengths:
        start = rng.randrange(0, len(ids) - n)
        out.append(ids[start : start + n])
    return out


def summarize(model, scenario, system, prompts, starts, firsts, ends, n_out, wall) -> Result:
    ttfts = [f - s for s, f in zip(starts, firsts, strict=True)]
    tpots = [(e - f) / (n_out - 1) * 1e3 for f, e in zip(firsts, ends, strict=True)]
    total_out = n_out * len(prompts)
    return Result(
        model=model,
        scenario=scenario,
        system=system,
        requests=len(prompts),
        prompt_tokens=sum(map(len, prompts)),
        output_tokens=total_out,
        wall_s=round(wall, 3),
        output_tok_s=round(total_out / wall, 2),
        ttft_mean_s=round(statistics.fmean(ttfts), 4),
        ttft_p50_s=round(statistics.median(ttfts), 4),
        tpot_mean_ms=round(statistics.fmean(tpots), 2),
    )


def run_ours(engine: LLMEngine, prompts, n_out, model, scenario) -> Result:
    params = SamplingParams(max_tokens=n_out, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    ids = [f"{scenario}-{i}-{time.monotonic_ns()}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts, strict=True):
        engine.add_request(rid, p, params)
    first, end, count = {}, {}, {}
    while engine.has_unfinished():
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            first.setdefault(o.request_id, now)
            count[o.request_id] = count.get(o.request_id, 0) + len(o.new_token_ids)
            if o.finished:
                end[o.request_id] = now
    wall = time.perf_counter() - t0
    assert all(count[r] == n_out for r in ids), "every request must produce max_tokens tokens"
    starts = [t0] * len(ids)
    return summarize(
        model,
        scenario,
        "splitserve",
        prompts,
        starts,
        [first[r] for r in ids],
        [end[r] for r in ids],
        n_out,
        wall,
    )


class _StepClock:
    """A logits processor that only timestamps: transformers calls it once per generated token,
    right after that step's forward pass."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def run_hf(hf, pad_id: int, prompts, n_out, model, scenario) -> Result:
    from transformers import LogitsProcessorList

    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding, as batched generation requires
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    clock = _StepClock()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=n_out,
            min_new_tokens=n_out,
            do_sample=False,
            pad_token_id=pad_id,
            logits_processor=LogitsProcessorList([clock]),
        )
    wall = time.perf_counter() - t0
    assert out.shape[1] - width == n_out
    k = len(prompts)
    return summarize(
        model, scenario, "transformers", prompts, [t0] * k, [clock.times[0]] * k, [t0 + wall] * k,
        n_out, wall,
    )  # fmt: skip


def bench_model(name: str, model_dir: Path, cfg: dict, seed: int) -> list[Result]:
    from transformers import AutoModelForCausalLM

    engine = LLMEngine(
        model_dir,
        EngineConfig(dtype="float32", max_num_seqs=64, max_num_batched_tokens=cfg["budget"]),
        seed=seed,
    )
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = engine.tokenizer
    pad_id = engine.eos_token_ids[0]  # masked out; any id works
    rng = random.Random(seed)
    single = prompts_from_corpus(tok, [cfg["single_prompt"]], seed)
    lengths = [rng.randint(*cfg["mixed_range"]) for _ in range(cfg["concurrent"])]
    mixed = prompts_from_corpus(tok, lengths, seed + 1)

    # Warm both sides up (allocator, kernels, lazy inits) on a tiny run.
    run_ours(engine, single, 4, name, "warmup")
    run_hf(hf, pad_id, single, 4, name, "warmup")

    results = []
    for scenario, prompts in (("single", single), ("concurrent", mixed)):
        for fn in (
            lambda p=prompts, s=scenario: run_ours(engine, p, cfg["max_tokens"], name, s),
            lambda p=prompts, s=scenario: run_hf(hf, pad_id, p, cfg["max_tokens"], name, s),
        ):
            r = fn()
            results.append(r)
            print(
                f"{r.model:>8} {r.scenario:>10} {r.system:>12}: {r.output_tok_s:8.1f} tok/s  "
                f"TTFT {r.ttft_mean_s * 1e3:8.1f} ms  TPOT {r.tpot_mean_ms:7.1f} ms  "
                f"({r.requests} req, {r.prompt_tokens} prompt tok, {r.wall_s:.1f} s)",
                flush=True,
            )
    engine.check_integrity()
    return results


def ratio(results: list[Result], model: str, scenario: str) -> float | None:
    by = {r.system: r for r in results if r.model == model and r.scenario == scenario}
    if "splitserve" not in by or "transformers" not in by:
        return None
    return round(by["splitserve"].output_tok_s / by["transformers"].output_tok_s, 3)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller run, under 60 s on 2 cores")
    ap.add_argument("--json", type=Path, help="write the report here")
    ap.add_argument("--models", default=None, help="comma list of smollm2,small")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    if args.quick:
        cfg = dict(single_prompt=32, max_tokens=32, concurrent=16, mixed_range=(16, 128))
        models = args.models or "smollm2"
    else:
        cfg = dict(single_prompt=64, max_tokens=64, concurrent=32, mixed_range=(16, 256))
        models = args.models or "smollm2,small"
    cfg["budget"] = 512
    print(f"machine: {machine()}\nconfig: {cfg}", flush=True)

    results: list[Result] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in models.split(","):
            if name == "smollm2":
                model_dir = pull_model("smollm2-135m-instruct", progress=False)
            elif name == "small":
                model_dir = make_model("small", Path(tmp) / "small", seed=args.seed)
            else:
                ap.error(f"unknown model {name!r}: choose smollm2 or small")
            results += bench_model(name, model_dir, cfg, args.seed)

    summary = {
        "ratio_single": ratio(results, "smollm2", "single"),
        "ratio_concurrent": ratio(results, "smollm2", "concurrent"),
    }
    for r in results:
        if r.system == "splitserve":
            summary[f"{r.model}_{r.scenario}_tok_s"] = r.output_tok_s
            summary[f"{r.model}_{r.scenario}_tpot_ms"] = r.tpot_mean_ms
    for m in sorted({r.model for r in results}):
        for s in ("single", "concurrent"):
            summary.setdefault(f"{m}_ratio_{s}", ratio(results, m, s))
    print("summary:", json.dumps(summary))
    write_report(
        args.json, "engine", argv, [asdict(r) for r in results], summary,
        config={k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
