"""The engine against transformers' reference forward pass, in float32."""

import pytest
import torch

from tests.engine_helpers import (
    GREEDY,
    forward_all_logits,
    hf_greedy,
    hf_model,
    make_engine,
    random_prompts,
)

FAMILIES = ["tiny_model_dir", "qwen2_model_dir", "llama31_model_dir"]


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(family, request):
    model_dir = request.getfixturevalue(family)
    engine = make_engine(model_dir)
    hf = hf_model(model_dir)
    # Lengths straddle block boundaries; the 1-token prompt goes through the decode path.
    prompts = [*random_prompts(5, engine.model_config.vocab_size, 2, 90, seed=1), [7]]
    ours = forward_all_logits(engine, prompts)
    for p, got in zip(prompts, ours, strict=True):
        with torch.no_grad():
            ref = hf(torch.tensor([p])).logits[0]
        assert (got - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers_alone_and_batched(family, request):
    model_dir = request.getfixturevalue(family)
    hf = hf_model(model_dir)
    vocab = hf.config.vocab_size
    prompts = random_prompts(5, vocab, 3, 60, seed=2)
    expected = [hf_greedy(hf, p, 64) for p in prompts]

    engine = make_engine(model_dir)
    for p, exp in zip(prompts, expected, strict=True):
        [alone] = engine.generate([p], GREEDY)
        assert alone.token_ids == exp
    # Batched with each other and with unrelated requests of other lengths and parameters.
    others = random_prompts(6, vocab, 1, 120, seed=3)
    mixed = prompts + others
    params = [GREEDY] * 5 + [
        GREEDY.__class__(max_tokens=17, temperature=0.9, seed=i) for i in range(6)
    ]
    results = make_engine(model_dir, max_num_batched_tokens=64).generate(mixed, params)
    assert [r.token_ids for r in results[:5]] == expected


def test_rope_scaling_changes_long_positions(llama31_model_dir, tiny_model_dir):
    """The llama3 scaling config really takes the scaled path (original context 64 < prompt)."""
    from services.engine.config import ModelConfig

    cfg = ModelConfig.from_dir(llama31_model_dir)
    assert cfg.rope_scaling is not None and cfg.rope_scaling.rope_type == "llama3"
    assert cfg.rope_scaling.original_max_position_embeddings < 100


@pytest.mark.slow
def test_smollm2_chat_answers_match_transformers(smollm2_dir):
    engine = make_engine(smollm2_dir, num_kv_blocks=128)
    hf = hf_model(smollm2_dir)
    questions = ["What is the capital of France?", "Name three primary colors."]
    for q in questions:
        prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": q}])
        expected = hf_greedy(hf, prompt, 24)
        [out] = engine.generate(
            [prompt], GREEDY.__class__(max_tokens=24, temperature=0.0, ignore_eos=True)
        )
        assert out.token_ids == expected
    prompt = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}]
    )
    [out] = engine.generate([prompt], GREEDY.__class__(max_tokens=24, temperature=0.0))
    assert "Paris" in out.text
