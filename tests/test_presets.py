"""Synthetic model presets: transformers loads them, they are deterministic, real tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer as RawTokenizer

from services.engine.config import ModelConfig
from services.engine.errors import ModelLoadError
from services.model_prep.presets import (
    CHATML_TEMPLATE,
    PRESETS,
    get_preset,
    hf_config,
    make_model,
    parameter_shapes,
)

UTF8_SAMPLES = [
    "Hello, world!",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n\n",
    "control \x00\x01\x07\x1b[31m\x7f chars",
    "emoji 🦀🎉👍🏽 family 👨‍👩‍👧‍👦 flag 🇯🇵",
    "中文分词测试，日本語のテキスト、한국어 문장",
    "Ελληνικά русский עברית العربية हिन्दी",
    "combining e\u0301 vs \u00e9, zero\u200bwidth, BOM \ufeff",
    "astral 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𐍈 \U0010fffd",
    "mixed 12345 3.14159 0xDEADBEEF <|not_special|>",
]


def load_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def hf_logits(model_dir: Path, ids: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def test_tiny_loads_in_transformers(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.dtype == torch.float32
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads) == (2, 64, 4)
    assert (cfg.num_key_value_heads, cfg.intermediate_size, cfg.vocab_size) == (2, 128, 2048)
    assert cfg.tie_word_embeddings and cfg.max_position_embeddings == 2048
    assert len(tok) == cfg.vocab_size == 2048  # tokenizer vocab equals config vocab

    ids = tok("The river flows to the sea.")["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), 2048)
    assert torch.isfinite(logits).all()

    weights = load_weights(tiny_model_dir)
    assert "lm_head.weight" not in weights  # tied
    assert weights["model.embed_tokens.weight"].shape == (2048, 64)
    assert weights["model.layers.1.self_attn.k_proj.weight"].shape == (32, 64)
    assert weights["model.layers.0.self_attn.q_proj.weight"].std().item() == pytest.approx(
        0.02, rel=0.1
    )
    norm = weights["model.layers.0.input_layernorm.weight"]
    # Near 1 but not trivially 1, so a loader that ignores norm weights is caught.
    assert (norm - 1).abs().max() > 0.01 and (norm - 1).abs().mean() < 0.2


def test_config_json_reads_back(tiny_model_dir: Path, llama31_model_dir: Path) -> None:
    raw = json.loads((tiny_model_dir / "config.json").read_text())
    assert raw["architectures"] == ["LlamaForCausalLM"]
    assert raw["model_type"] == "llama" and raw["torch_dtype"] == "float32"
    cfg = ModelConfig.from_dir(tiny_model_dir)
    assert cfg.head_dim == 16 and cfg.eos_token_ids == (2, 0) and cfg.rope_scaling is None
    scaled = ModelConfig.from_dir(llama31_model_dir)
    assert scaled.rope_scaling is not None
    assert scaled.rope_scaling.rope_type == "llama3"
    assert scaled.rope_scaling.original_max_position_embeddings == 64


def test_qwen2_variant(qwen2_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(qwen2_model_dir, local_files_only=True)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    weights = load_weights(qwen2_model_dir)
    for proj in ("q_proj", "k_proj", "v_proj"):
        bias = weights[f"model.layers.0.self_attn.{proj}.bias"]
        assert bias.abs().sum() > 0  # random, not zeros
        torch.testing.assert_close(model.model.layers[0].self_attn.__getattr__(proj).bias, bias)
    assert "model.layers.0.self_attn.o_proj.bias" not in weights
    assert ModelConfig.from_dir(qwen2_model_dir).attention_bias

    # transformers 5 rebuilds qwen2 tokenizers with Qwen2's own pre-tokenizer; the variant is
    # trained with it, so tokenizer.json and transformers agree (digits split one by one).
    tok = AutoTokenizer.from_pretrained(qwen2_model_dir, local_files_only=True)
    raw = RawTokenizer.from_file(str(qwen2_model_dir / "tokenizer.json"))
    for text in [*UTF8_SAMPLES, "year 2024: 1,234,567 items"]:
        assert tok(text)["input_ids"] == raw.encode(text).ids


def test_llama31_variant_rope_scaling_matters(
    llama31_model_dir: Path, tiny_model_dir: Path
) -> None:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(llama31_model_dir, local_files_only=True)
    rope = getattr(cfg, "rope_parameters", None) or cfg.rope_scaling
    assert rope["rope_type"] == "llama3" and rope["original_max_position_embeddings"] == 64
    # Same weights (same seed and shapes); only the frequency scaling differs, and with an
    # original context of 64 it changes the logits well inside a short prompt.
    assert torch.equal(
        load_weights(llama31_model_dir)["model.layers.0.mlp.up_proj.weight"],
        load_weights(tiny_model_dir)["model.layers.0.mlp.up_proj.weight"],
    )
    ids = list(range(3, 3 + 96))
    a, b = hf_logits(llama31_model_dir, ids), hf_logits(tiny_model_dir, ids)
    assert not torch.allclose(a[-1], b[-1], atol=1e-4)


def test_variant_argument_equals_preset_name(tmp_path: Path) -> None:
    a = make_model("tiny", tmp_path / "a", variant="qwen2")
    b = make_model("tiny-qwen2", tmp_path / "b")
    assert (a / "config.json").read_text() == (b / "config.json").read_text()
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_forced_sharding_loads_and_matches(tmp_path: Path, tiny_model_dir: Path) -> None:
    sharded = make_model("tiny", tmp_path / "sharded", seed=0, shard_bytes=64 * 1024)
    files = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(files) > 2 and not (sharded / "model.safetensors").exists()
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    weights = load_weights(sharded)
    assert set(index["weight_map"]) == set(weights)
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in weights.values()
    )
    ids = [5, 100, 7, 2000, 42]
    torch.testing.assert_close(
        hf_logits(sharded, ids), hf_logits(tiny_model_dir, ids), rtol=0, atol=0
    )


def test_deterministic_for_a_seed(tmp_path: Path, tiny_model_dir: Path) -> None:
    again = make_model("tiny", tmp_path / "again", seed=0)
    other = make_model("tiny", tmp_path / "other", seed=1)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (tiny_model_dir / name).read_bytes()
    w0, w1 = load_weights(tiny_model_dir), load_weights(other)
    assert not torch.equal(w0["model.embed_tokens.weight"], w1["model.embed_tokens.weight"])


def test_dtype_override(tmp_path: Path) -> None:
    d = make_model("tiny", tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((d / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in load_weights(d).values())
    with pytest.raises(ModelLoadError, match="unsupported dtype"):
        make_model("tiny", tmp_path / "bad", dtype="int8")


@pytest.mark.parametrize("text", UTF8_SAMPLES)
def test_utf8_round_trip(tiny_model_dir: Path, text: str) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    ids = tok(text)["input_ids"]
    assert all(0 <= i < len(tok) for i in ids)
    assert tok.decode(ids) == text


def test_every_byte_round_trips(tiny_model_dir: Path) -> None:
    raw = RawTokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    text = "".join(chr(c) for c in range(1, 0x3000, 7)) + "".join(
        chr(c) for c in range(0x1F300, 0x1F700, 13)
    )
    assert raw.decode(raw.encode(text).ids) == text


def test_chat_template_renders(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    assert tok.chat_template == CHATML_TEMPLATE
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") == 1
    assert ids.count(tok.convert_tokens_to_ids("<|im_end|>")) == 2
    no_prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert not no_prompt.endswith("assistant\n")


def test_unknown_preset_and_variant() -> None:
    with pytest.raises(ModelLoadError, match=r"unknown preset 'huge'.*tiny.*llama-8b"):
        get_preset("huge")
    with pytest.raises(ModelLoadError, match=r"unknown variant 'mamba'.*qwen2"):
        get_preset("tiny", "mamba")


def test_big_presets_have_exact_llama_shapes() -> None:
    # Shapes only: these presets are far too large to write in a test.
    def n_params(name: str) -> int:
        return sum(torch.Size(s).numel() for _, s in parameter_shapes(PRESETS[name]))

    assert n_params("llama-1b") == 1_235_814_400  # Llama-3.2-1B
    assert n_params("llama-8b") == 8_030_261_248  # Llama-3.1-8B
    assert 90e6 < n_params("small") < 130e6

    c1 = hf_config(PRESETS["llama-1b"])
    assert (c1["hidden_size"], c1["num_hidden_layers"], c1["num_attention_heads"]) == (2048, 16, 32)
    assert (c1["num_key_value_heads"], c1["head_dim"], c1["intermediate_size"]) == (8, 64, 8192)
    assert c1["vocab_size"] == 128256 and c1["rope_theta"] == 500000.0 and c1["tie_word_embeddings"]
    assert c1["max_position_embeddings"] == 131072 and c1["torch_dtype"] == "bfloat16"
    assert c1["rope_scaling"] == {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    c8 = hf_config(PRESETS["llama-8b"])
    assert (c8["hidden_size"], c8["num_hidden_layers"], c8["intermediate_size"]) == (
        4096,
        32,
        14336,
    )
    assert c8["head_dim"] == 128 and not c8["tie_word_embeddings"]
    assert c8["rope_scaling"]["factor"] == 8.0
    names = {n for n, _ in parameter_shapes(PRESETS["llama-8b"])}
    assert "lm_head.weight" in names


def test_small_tokenizer_ids_fit_the_config_vocab(tmp_path: Path) -> None:
    from services.model_prep.presets import trained_tokenizer

    tok = trained_tokenizer(PRESETS["small"].vocab_size)
    # The bundled text supports a few thousand merges, far fewer than 32000: every id the
    # tokenizer can produce must still index the (larger) embedding table.
    assert 2048 < tok.get_vocab_size() <= PRESETS["small"].vocab_size
    assert [tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [
        0,
        1,
        2,
    ]
