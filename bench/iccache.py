"""IC-Cache on real models and real questions: BIG-bench qa_wikidata (an excerpt shipped in
bench/data), SmolLM2-135M-Instruct as the small model and Qwen2.5-Coder-0.5B-Instruct as the
large one by default (--small/--large: any `splitserve models pull` name or a preset such as
llama-1b / llama-8b on a GPU with --device cuda), all-MiniLM-L6-v2 embeddings.

The first `--warm` questions are the history: answered by the large model through the route,
admitted as examples (the manager's rules: complete answers only) and judged (exact match), so
the outcome memory knows what the large model scored on them. The next `--test` questions are
then served four ways on the same hardware, one after the other:
  all-large, all-small, IC-Cache (selector + LinUCB bandit over the judged-outcome estimates,
  with feedback = exact match against the reference, load penalty off: one request stream),
  and a semantic *answer* cache (the nearest past answer returned verbatim when cosine >= 0.8,
  else the large model).
Each way runs its requests as engine batches (small and large batches separately) on engines
whose prefix cache is emptied first (no way reuses another's prompts' KV); throughput is
questions per second of wall time including embedding and selection. Quality: exact match
against the references (accuracy), and the win rate against the large model's answer judged
by the large model (both orders asked, so a position bias cancels; identical answers tie; 0.5
is parity).

    python bench/iccache.py [--quick] [--json PATH]

Summary keys: throughput_gain (IC-Cache / all-large questions per s), quality_ratio
(IC-Cache / all-large accuracy), small_share, answer_cache_quality_ratio, win_rate (IC-Cache's
answers against all-large's, judged by the large model), answer_cache_win_rate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import write_report
from kvstore.redis_server import EmbeddedRedis
from router.iccache.cache import ICCache
from router.iccache.config import ICCacheConfig, ICRoute
from router.iccache.replay import judge_messages, preference
from services.embedder import BatchingEmbedder, Embedder
from services.engine.completion import Completion
from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.engine.sampling_params import SamplingParams
from services.engine.tokenizer import load_tokenizer
from services.model_prep.presets import PRESETS
from splitserve.app_config import EngineSpec, ModelSpec
from splitserve.embed_pull import pull_embedder
from splitserve.up import resolve_model_path

DATA = Path(__file__).parent / "data" / "qa_wikidata_600.json"
SYSTEM = "Complete the sentence with the short fact only, no explanation."
ANSWER_CACHE_SIM = 0.8
MAX_TOKENS = 8


def resolve(model: str) -> tuple[Path, str]:
    """A pulled model's name (pulled once), a preset's (made once) or a directory, and the
    engine's load format: a preset's random weights are drawn on the device (load_format
    dummy), not written out and read back (16 GB for llama-8b)."""
    fmt = "dummy" if model in PRESETS else "auto"
    return resolve_model_path(
        ModelSpec(name="m", path=model, engine=EngineSpec(load_format=fmt))
    ), fmt


def norm(s: str) -> str:
    return re.sub(r"[^a-z0-9 ]", " ", s.lower()).split("\n")[0].strip()


def correct(answer: str, targets: list[str]) -> bool:
    a = " " + " ".join(norm(answer).split()) + " "
    return any(" " + " ".join(norm(t).split()) + " " in a for t in targets if norm(t))


class LocalEmbed:
    """The embedding model in this process, batching concurrent calls as the embed service
    does (the router asks that service instead). Make it inside the event loop."""

    def __init__(self, model: Embedder) -> None:
        self.model = model
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="embed")
        self.batcher = BatchingEmbedder(model, self.pool)

    async def embed(self, texts: list[str]) -> np.ndarray:
        return await self.batcher.embed(texts)

    async def close(self) -> None:
        self.pool.shutdown(wait=False)


def messages(question: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


def run_batch(engine: LLMEngine, tok, convs: list[list[dict]], max_tokens: int):
    if not convs:
        return []
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return engine.generate([tok.apply_chat_template(c) for c in convs], [params] * len(convs))


def win_rates(engine: LLMEngine, tok, questions: list[str], ref: list[str],
              ways: dict[str, list[str]]) -> dict[str, float]:  # fmt: skip
    """Per way, how often the large model prefers its answer to the large model's own: each
    pair is asked in both orders and the preference is the difference of the judge's log
    odds of "A" over "B" between the orders (so a bias for a position cancels); 1 preferred,
    0 not, 0.5 identical answers or no preference."""
    ids = (tok.encode("A")[-1], tok.encode("B")[-1])
    prompts, index = [], []
    for way, answers in ways.items():
        for k, (q, a, r) in enumerate(zip(questions, answers, ref, strict=True)):
            if a.strip() != r.strip():
                convs = [judge_messages(q, a, r), judge_messages(q, r, a)]
                prompts += [tok.apply_chat_template(c) for c in convs]
                index.append((way, k))
    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=20)
    outs = engine.generate(prompts, [params] * len(prompts)) if prompts else []
    score = {way: [0.5] * len(questions) for way in ways}
    for i, (way, k) in enumerate(index):
        first, second = (dict(o.logprobs[0].top_logprobs) if o.logprobs else {}
                         for o in outs[2 * i : 2 * i + 2])  # fmt: skip
        pref = preference(first, second, ids)  # > 0: the way's answer
        score[way][k] = 0.5 if pref == 0 else float(pref > 0)
    return {way: float(np.mean(s)) for way, s in score.items()}


async def main_async(args: argparse.Namespace) -> dict:
    data = json.loads(DATA.read_text())["examples"]
    warm, test = data[: args.warm], data[args.warm : args.warm + args.test]
    (small_dir, small_fmt), (large_dir, large_fmt) = resolve(args.small), resolve(args.large)
    mix = np.random.default_rng(0)  # --small-share: the fixed routing mix

    def load(model_dir: Path, fmt: str) -> LLMEngine:
        """Its one-time costs (kernels and graphs for each batch size a way will run) paid
        first, on prompts sharing no block with the questions: a full batch of question-sized
        prompts stepped down to one running sequence, then a batch of longer ones (prompts
        with examples)."""
        cfg = EngineConfig(
            num_kv_blocks=args.kv_blocks, max_num_seqs=args.batch, device=args.device,
            dtype=args.dtype, load_format=fmt,
        )  # fmt: skip
        engine = LLMEngine(model_dir, cfg)
        for n in (48, 256):
            warm_ids = [[7 + (k % 50), *range(100 + k, 100 + k + n)] for k in range(args.batch)]
            lens = [SamplingParams(max_tokens=1 + k % args.max_tokens, temperature=0.0,
                                   ignore_eos=True) for k in range(args.batch)]  # fmt: skip
            engine.generate(warm_ids, lens)
        return engine

    def fresh(engine: LLMEngine) -> LLMEngine:
        """The engine with an empty prefix cache, as if loaded anew: no way reuses the KV of
        another way's prompts (or of the warm-up's)."""
        engine.pool.forget_cached()
        return engine

    small, large = load(small_dir, small_fmt), load(large_dir, large_fmt)
    tok_s, tok_l = load_tokenizer(small_dir), load_tokenizer(large_dir)
    embedder = LocalEmbed(Embedder(pull_embedder()))
    results: list[dict] = []

    with EmbeddedRedis() as redis:
        route = ICRoute(name="auto", small="small", large="large")
        ic = ICCache(
            ICCacheConfig(routes=(route,), max_examples=4, min_similarity=0.5),
            redis.url, "bench", embed=embedder,  # type: ignore[arg-type]
            count_tokens=lambda s: len(tok_s.encode(s)),
        )  # fmt: skip
        # The history: the large model answered the warm questions through the route and
        # each answer was judged (exact match), so the store holds its complete answers and
        # the outcome memory what the large model scored on requests like the test's.
        t0 = time.perf_counter()
        outs = run_batch(large, tok_l, [messages(q["input"]) for q in warm], args.max_tokens)
        admitted = 0
        for k, (q, out) in enumerate(zip(warm, outs, strict=True)):
            d = await ic.decide(route, "bench", messages(q["input"]), "large")
            got = await ic.finish(d, f"w{k}", out.text, out.finish_reason, len(out.token_ids))
            await ic.feedback("bench", f"w{k}", float(correct(out.text, q["target"])))
            admitted += got.admitted
        print(f"warm: {len(warm)} large answers, {admitted} admitted "
              f"({time.perf_counter() - t0:.0f}s)", flush=True)  # fmt: skip

        def record(way: str, answers: list[str], seconds: float, small_n: int,
                   arms: list[str] | None = None, **extra: float) -> dict:  # fmt: skip
            hits = [correct(a, q["target"]) for a, q in zip(answers, test, strict=True)]
            r = {
                "way": way, "questions": len(test), "accuracy": float(np.mean(hits)),
                "seconds": seconds, "questions_per_s": len(test) / seconds,
                "small_share": small_n / len(test),
            }  # fmt: skip
            if arms is not None:  # per arm: how many questions it took, how many it got right
                r["arms"] = {
                    a: {"questions": arms.count(a),
                        "accuracy": float(np.mean([h for h, b in zip(hits, arms, strict=True)
                                                   if b == a]))}
                    for a in sorted(set(arms))
                }  # fmt: skip
            r.update(extra)
            print(json.dumps(r), flush=True)
            results.append(r)
            return r

        large = fresh(large)
        t = time.perf_counter()
        large_ans = [
            o.text
            for o in run_batch(large, tok_l, [messages(q["input"]) for q in test], args.max_tokens)
        ]
        r_large = record("all-large", large_ans, time.perf_counter() - t, 0)
        small = fresh(small)
        t = time.perf_counter()
        small_ans = [
            o.text
            for o in run_batch(small, tok_s, [messages(q["input"]) for q in test], args.max_tokens)
        ]
        r_small = record("all-small", small_ans, time.perf_counter() - t, len(test))

        # The answer cache: the nearest past answer verbatim at cosine >= 0.8.
        large = fresh(large)
        t = time.perf_counter()
        q_embs = embedder.model.embed([q["input"] for q in test])
        ans: list[str | None] = []
        for e in q_embs:
            hits = await ic.store.search(["bench"], e, 1)
            ok = hits and hits[0].similarity >= ANSWER_CACHE_SIM
            ans.append(hits[0].example.response if ok else None)
        miss = [k for k, a in enumerate(ans) if a is None]
        missed = run_batch(
            large, tok_l, [messages(test[k]["input"]) for k in miss], args.max_tokens
        )
        for k, o in zip(miss, missed, strict=True):
            ans[k] = o.text
        ac_ans = [a or "" for a in ans]
        r_ac = record("answer-cache", ac_ans, time.perf_counter() - t, len(test) - len(miss))

        small, large = fresh(small), fresh(large)
        t = time.perf_counter()
        ic_ans, ds, n_small, decide_s, busy = await serve_stream(
            ic, route, test, {"small": (small, tok_s), "large": (large, tok_l)},
            args.batch, args.max_tokens, mix if args.small_share is not None else None,
            args.small_share or 0.0,
        )  # fmt: skip
        # decide_seconds: the embedding, search, selection and bandit, in wall time when no
        # model was stepping
        r_ic = record("iccache", ic_ans, time.perf_counter() - t, n_small,
                      [ds[k].arm for k in range(len(test))], decide_seconds=decide_s,
                      steps={w: b[0] for w, b in busy.items()},
                      step_seconds={w: b[1] for w, b in busy.items()})  # fmt: skip
        await ic.close()

    others = {"all-small": small_ans, "answer-cache": ac_ans, "iccache": ic_ans}
    wins = win_rates(large, tok_l, [q["input"] for q in test], large_ans, others)
    for r in results:
        r["win_rate"] = wins.get(r["way"], 0.5)  # all-large against itself: parity
    print(json.dumps({"win_rate": wins}), flush=True)

    return {
        "results": results,
        "summary": {
            "throughput_gain": r_ic["questions_per_s"] / r_large["questions_per_s"],
            "quality_ratio": r_ic["accuracy"] / max(r_large["accuracy"], 1e-9),
            "small_share": r_ic["small_share"],
            "answer_cache_quality_ratio": r_ac["accuracy"] / max(r_large["accuracy"], 1e-9),
            "win_rate": wins["iccache"],
            "answer_cache_win_rate": wins["answer-cache"],
            "large_accuracy": r_large["accuracy"],
            "small_accuracy": r_small["accuracy"],
        },
    }


async def serve_stream(
    ic: ICCache, route: ICRoute, test: list[dict], engines: dict, batch: int, max_tokens: int,
    mix: np.random.Generator | None, small_share: float,
) -> tuple[list[str], dict, int, float, dict]:  # fmt: skip
    """IC-Cache over a stream served as a server would. Requests are decided as they arrive,
    in groups of `batch` decided concurrently (their embeddings share a pass, as the embed
    service batches concurrent calls), up to a batch ahead of each model's running one. Each
    model runs continuous batching: a finished request's slot takes the next arrival routed
    there, and a model steps only with a full batch until the stream ends. Each answer is
    judged (feedback) as soon as it finishes, so later decisions learn from it.

    The models step in turns on the event loop while a group's embedding pass runs in its
    own thread. A thread per model was slower on a GPU (H100: 120 against 151 questions/s;
    their host threads contend for the GIL). Returns (answers, decisions, small count,
    seconds deciding while no model stepped, {model: [steps, seconds in them]}).
    """
    n = len(test)
    answers, ds = [""] * n, {}
    inbox: dict[str, list] = {w: [] for w in engines}
    live: dict[str, dict] = {w: {} for w in engines}
    wake = {w: asyncio.Event() for w in [*engines, "feed"]}
    state = {"next": 0, "small": 0, "decide_s": 0.0, "fed": False}
    judged: list[asyncio.Task] = []
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    busy = {w: [0, 0.0] for w in engines}

    def room() -> bool:
        # One batch decided ahead of what each model runs: a server's router decides each
        # request as it arrives, while the models step, not only once a slot is free.
        return all(len(live[w]) + len(inbox[w]) < 2 * batch for w in engines)

    async def judge(k: int, rid: str, c: Completion) -> None:
        await ic.finish(ds[k], rid, c.text, c.finish_reason, len(c.token_ids))
        await ic.feedback("bench", rid, float(correct(c.text, test[k]["target"])))

    async def feed() -> None:
        while state["next"] < n:
            while not room():
                wake["feed"].clear()
                await wake["feed"].wait()
            idx = list(range(state["next"], min(state["next"] + batch, n)))
            state["next"] = idx[-1] + 1
            forced = [None] * len(idx)
            if mix is not None:  # the fixed routing mix
                forced = ["small+examples" if mix.random() < small_share else "large"
                          for _ in idx]  # fmt: skip
            t_d, stepped = time.perf_counter(), sum(b[1] for b in busy.values())
            got = await asyncio.gather(*(
                ic.decide(route, "bench", messages(test[k]["input"]), f)
                for k, f in zip(idx, forced, strict=True)
            ))  # fmt: skip
            # the models' steps taken meanwhile are theirs: what is left held them up
            stepped = sum(b[1] for b in busy.values()) - stepped
            state["decide_s"] += time.perf_counter() - t_d - stepped
            for k, d in zip(idx, got, strict=True):
                ds[k] = d
                tok = engines[d.model][1]
                prompt = tok.apply_chat_template(d.messages(messages(test[k]["input"])))
                inbox[d.model].append((k, prompt))
                state["small"] += d.model == "small"
            for w in engines:
                wake[w].set()
        state["fed"] = True
        for w in engines:  # the stream ended: part-full batches run now
            wake[w].set()

    async def drive(which: str) -> None:
        engine = engines[which][0]
        mine = live[which]
        while True:
            for k, prompt in inbox[which]:
                engine.add_request(f"q{k}", prompt, params)
                mine[f"q{k}"] = (k, Completion(f"q{k}", list(prompt)))
            inbox[which].clear()
            if not mine and state["fed"]:
                return
            if not mine or (len(mine) < batch and not state["fed"]):
                wake[which].clear()  # a part-full batch waits for arrivals
                await wake[which].wait()
                continue
            t_s = time.perf_counter()
            outs = engine.step()
            busy[which][0] += 1
            busy[which][1] += time.perf_counter() - t_s
            for out in outs:
                k, c = mine[out.request_id]
                c.add(out)
                if out.finished:
                    del mine[out.request_id]
                    answers[k] = c.text
                    judged.append(asyncio.create_task(judge(k, out.request_id, c)))
                    wake["feed"].set()
            await asyncio.sleep(0)  # the other model's turn, and the decisions

    await asyncio.gather(feed(), *(drive(w) for w in engines))
    await asyncio.gather(*judged)
    return answers, ds, state["small"], state["decide_s"], busy


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="8 warm + 8 test questions")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--warm", type=int, default=200)
    ap.add_argument("--test", type=int, default=400)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--kv-blocks", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=MAX_TOKENS,
                    help="an answer's cap (short facts: 8; random-weight presets, which run every "
                    "answer to the cap, measure serving at a chat's length, e.g. 64)")  # fmt: skip
    ap.add_argument("--small", default="smollm2-135m-instruct")
    ap.add_argument("--large", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16")
    ap.add_argument(
        "--small-share", type=float, default=None,
        help="route this share of IC-Cache's questions to small+examples and the rest to large "
        "(a fixed mix, e.g. the one a CPU run measured) instead of the bandit's picks",
    )  # fmt: skip
    args = ap.parse_args(argv)
    if args.quick:
        args.warm, args.test = 8, 8
    out = asyncio.run(main_async(args))
    print(json.dumps(out["summary"], indent=2))
    write_report(args.json, "iccache", argv, out["results"], out["summary"])


if __name__ == "__main__":
    main()
