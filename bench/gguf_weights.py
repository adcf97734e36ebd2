"""The opt-in 4-bit path (engine load_format "gguf") against float32 on the same model: speed
alone and at N concurrent requests, and how far its greedy answers stay from float32's.

Both engines serve SmolLM2-135M-Instruct: float32 runs the weights `splitserve models pull`
dequantized from the shipped Q4_1 GGUF, gguf runs that file's own blocks (Q4_1 matrices, the
Q8_0 embedding as the tied LM head). Agreement is measured on held-out chat questions
(BIG-bench qa_wikidata, bench/data): the share of answer tokens equal to float32's up to the
first difference, the share of answers identical, and each side's accuracy on the references.

    python bench/gguf_weights.py [--quick] [--json PATH] [--threads N]

Summary keys: speedup_alone, speedup_concurrent (gguf tok/s / float32's), agreement_tokens,
identical_answers, accuracy_float32, accuracy_gguf.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import machine, write_report
from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.engine.sampling_params import SamplingParams
from splitserve.models_pull import pull_model

QUESTIONS = Path(__file__).resolve().parent / "data/qa_wikidata_600.json"


def run(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> dict:
    """All prompts submitted together; tokens per request, tok/s and mean TPOT."""
    t0 = time.perf_counter()
    ids = [f"r{i}-{time.monotonic_ns()}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts, strict=True):
        engine.add_request(rid, p, params)
    first: dict[str, float] = {}
    end: dict[str, float] = {}
    toks: dict[str, list[int]] = {r: [] for r in ids}
    while engine.has_unfinished():
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            first.setdefault(o.request_id, now)
            toks[o.request_id] += o.new_token_ids
            if o.finished:
                end[o.request_id] = now
    wall = time.perf_counter() - t0
    n = sum(len(t) for t in toks.values())
    tpots = [(end[r] - first[r]) / max(1, len(toks[r]) - 1) for r in ids]
    return {
        "tokens": [toks[r] for r in ids],
        "tok_s": round(n / wall, 2),
        "tpot_ms": round(statistics.fmean(tpots) * 1e3, 2),
        "wall_s": round(wall, 2),
    }


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller run, under 60 s on 2 cores")
    ap.add_argument("--json", type=Path, help="write the report here")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    n_q, conc, n_out = (24, 16, 32) if args.quick else (100, 32, 64)
    print(f"machine: {machine()}", flush=True)

    model_dir = pull_model("smollm2-135m-instruct", progress=False)
    engines = {
        lf: LLMEngine(model_dir, EngineConfig(dtype="float32", load_format=lf), seed=0)
        for lf in ("auto", "gguf")
    }
    tok = engines["auto"].tokenizer
    examples = json.loads(QUESTIONS.read_text())["examples"][-n_q:]  # the end: held out

    def chat(text: str) -> list[int]:
        return tok.apply_chat_template([{"role": "user", "content": text}])

    questions = [chat(f"Complete with a short answer: {e['input']}") for e in examples]
    load = [chat(e["input"]) for e in examples[:conc]]
    greedy = SamplingParams(max_tokens=24, temperature=0.0)
    fixed = SamplingParams(max_tokens=n_out, temperature=0.0, ignore_eos=True)

    results, by = [], {}
    for lf, e in engines.items():
        run(e, load[:2], SamplingParams(max_tokens=4, temperature=0.0))  # warm-up
        answers = run(e, questions, greedy)["tokens"]
        alone = run(e, load[:1], fixed)
        concurrent = run(e, load, fixed)
        texts = [tok.decode(a) for a in answers]
        acc = statistics.fmean(
            any(t.lower() in txt.lower() for t in ex["target"])
            for ex, txt in zip(examples, texts, strict=True)
        )
        name = "float32" if lf == "auto" else "gguf"
        by[name] = {"answers": answers, "alone": alone, "concurrent": concurrent, "accuracy": acc}
        for scenario, r in (("alone", alone), (f"{conc} concurrent", concurrent)):
            results.append({
                "weights": name, "scenario": scenario, "tok_s": r["tok_s"],
                "tpot_ms": r["tpot_ms"], "wall_s": r["wall_s"],
            })  # fmt: skip
            print(f"{name:>8} {scenario:>14}: {r['tok_s']:7.1f} tok/s  TPOT {r['tpot_ms']:6.1f} ms")
        print(f"{name:>8} accuracy on {n_q} held-out questions: {acc:.2f}", flush=True)
        results.append({"weights": name, "scenario": "answers", "accuracy": round(acc, 3)})

    f32, q4 = by["float32"]["answers"], by["gguf"]["answers"]
    pairs = list(zip(f32, q4, strict=True))
    agree = sum(common_prefix(a, b) for a, b in pairs) / sum(map(len, f32))
    summary = {
        "speedup_alone": round(by["gguf"]["alone"]["tok_s"] / by["float32"]["alone"]["tok_s"], 3),
        "speedup_concurrent": round(
            by["gguf"]["concurrent"]["tok_s"] / by["float32"]["concurrent"]["tok_s"], 3
        ),
        "agreement_tokens": round(agree, 3),
        "identical_answers": round(statistics.fmean(a == b for a, b in pairs), 3),
        "accuracy_float32": round(by["float32"]["accuracy"], 3),
        "accuracy_gguf": round(by["gguf"]["accuracy"], 3),
        "threads": torch.get_num_threads(),
    }
    print("summary:", json.dumps(summary))
    write_report(args.json, "gguf_weights", argv, results, summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
