"""Shared pieces of the engine tests: building engines and the HF reference."""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import torch

from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.engine.sampling_params import SamplingParams
from services.engine.sched_output import NewRequestData, ScheduledSeq, SchedulerOutput

GREEDY = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)


def make_engine(model_dir: Path, **cfg) -> LLMEngine:
    cfg.setdefault("num_kv_blocks", 256)
    return LLMEngine(model_dir, EngineConfig(**cfg), seed=0)


def greedy_or_seeded(i: int) -> SamplingParams:
    """Greedy and seeded requests, alternating (the preemption tests' mix)."""
    if i % 2 == 0:
        return SamplingParams(max_tokens=28, temperature=0.0, ignore_eos=True)
    return SamplingParams(max_tokens=28, temperature=0.9, top_k=50, seed=100 + i, ignore_eos=True)


def run_checked(
    engine: LLMEngine, prompts, churn: float = 0.0, seed: int = 0, stored: bool = False
) -> dict[str, list[int]]:
    """Run greedy_or_seeded requests to the end, checking the engine's integrity after every
    step; tokens by request. churn: per step, the probability that one live request gets a new
    random priority (FastSwitch's update rate). stored: the KV tier holds every prompt's full
    blocks."""
    rng = random.Random(seed)
    for i, p in enumerate(prompts):
        extra = {"stored_blocks": len(p) // engine.block_size} if stored else {}
        engine.add_request(f"r{i}", p, greedy_or_seeded(i), priority=rng.randrange(4), **extra)
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    for _ in range(20000):
        if not engine.has_unfinished():
            break
        if churn and rng.random() < churn:
            engine.set_priority(f"r{rng.randrange(len(prompts))}", rng.randrange(4))
        for out in engine.step():
            assert out.error is None, out.error
            tokens[out.request_id] += out.new_token_ids
        engine.check_integrity()
    assert not engine.has_unfinished()
    if engine.swapper is not None:
        engine.swapper.wait_all()
        engine.scheduler._reap_swaps()
    assert engine.check_integrity().in_use == 0
    return tokens


def random_prompts(n: int, vocab: int, lo: int, hi: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def forward_all_logits(engine: LLMEngine, prompts: list[list[int]]) -> list[torch.Tensor]:
    """Our forward pass over several prompts in ONE flat batch; logits at every position."""
    engine.pool.check_integrity()
    so = SchedulerOutput()
    for i, p in enumerate(prompts):
        blocks = engine.pool.allocate(-(-len(p) // engine.block_size))
        so.new_requests.append(NewRequestData(f"p{i}", p, [], GREEDY, blocks, 0))
        seq = ScheduledSeq(f"p{i}", 0, len(p), [], samples=False)
        (so.decodes if len(p) == 1 else so.prefills).append(seq)
    runner = engine.runner
    runner.requests.update(so)
    ids, pos, meta, _ = runner.prepare(so)
    logits = engine.model.forward(ids, pos, meta, engine.kv_cache, None)
    for new in so.new_requests:
        engine.pool.release(new.block_ids)
    runner.requests.update(SchedulerOutput(finished_ids=[n.request_id for n in so.new_requests]))
    out, start = {}, 0
    for s in so.seqs:
        out[s.request_id] = logits[start : start + s.num_new]
        start += s.num_new
    return [out[f"p{i}"] for i in range(len(prompts))]


def hf_model(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy decoding with its KV cache, never stopping at EOS (ignore_eos)."""
    out: list[int] = []
    # `past_key_values` works across the transformers versions on our machines (newer ones
    # deprecate the name in favour of `cache`).
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        res = model(torch.tensor([prompt]), use_cache=True)
        for _ in range(n):
            tok = int(res.logits[0, -1].argmax())
            out.append(tok)
            res = model(torch.tensor([[tok]]), past_key_values=res.past_key_values, use_cache=True)
    return out
