"""Synthetic Hugging Face model directories with real shapes, seeded weights and a real tokenizer.

The weights are random, so the models say nothing useful, but everything else about the
directory is what a downloaded checkpoint looks like: config.json, generation_config.json,
(sharded) safetensors with Hugging Face parameter names, and a byte-level BPE tokenizer with
a ChatML chat template. transformers loads them, which is what tests and benchmarks need.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from services.engine.config import DTYPES, RopeScaling
from services.engine.errors import ModelLoadError

TRAINING_TEXT = Path(__file__).parent / "data" / "bpe_corpus.txt"

# Specials come first so their ids (0, 1, 2) exist whatever vocab size training reaches.
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

DEFAULT_SHARD_BYTES = 2 * 1024**3
WEIGHT_STD = 0.02
NORM_NOISE_STD = 0.05


@dataclass(frozen=True)
class Preset:
    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    dtype: str
    head_dim: int | None = None  # None: hidden_size // num_heads
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    architecture: str = "LlamaForCausalLM"

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def model_type(self) -> str:
        return MODEL_TYPES[self.architecture]

    @property
    def attention_bias(self) -> bool:
        # Qwen2 always carries q/k/v biases; the Llama presets never do.
        return self.architecture == "Qwen2ForCausalLM"


MODEL_TYPES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}

_LLAMA3_ROPE_1B = RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)
_LLAMA3_ROPE_8B = RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)

_BASE_PRESETS = (
    Preset(
        name="tiny", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
        intermediate_size=128, vocab_size=2048, max_position_embeddings=2048,
        tie_word_embeddings=True, dtype="float32",
    ),
    Preset(
        name="small", hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=4,
        intermediate_size=2048, vocab_size=32000, max_position_embeddings=4096,
        tie_word_embeddings=True, dtype="float32",
    ),
    # Llama-3.2-1B shapes.
    Preset(
        name="llama-1b", hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8,
        head_dim=64, intermediate_size=8192, vocab_size=128256, max_position_embeddings=131072,
        tie_word_embeddings=True, dtype="bfloat16", rope_theta=500000.0,
        rope_scaling=_LLAMA3_ROPE_1B,
    ),
    # Llama-3.1-8B shapes.
    Preset(
        name="llama-8b", hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
        head_dim=128, intermediate_size=14336, vocab_size=128256, max_position_embeddings=131072,
        tie_word_embeddings=False, dtype="bfloat16", rope_theta=500000.0,
        rope_scaling=_LLAMA3_ROPE_8B,
    ),
)  # fmt: skip

# Variants change one family trait of a base preset, so tests can cover the other code paths
# (q/k/v biases; Llama 3.1 frequency scaling) at tiny sizes.
VARIANTS: dict[str, Callable[[Preset], Preset]] = {
    "qwen2": lambda p: dataclasses.replace(
        p,
        name=f"{p.name}-qwen2",
        architecture="Qwen2ForCausalLM",
        rope_theta=1e6,
        rms_norm_eps=1e-6,
    ),
    # A small original context (64) puts short prompts past the scaling knee.
    "llama31": lambda p: dataclasses.replace(
        p,
        name=f"{p.name}-llama31",
        rope_theta=5e5,
        rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 64),
    ),
}

PRESETS: dict[str, Preset] = {p.name: p for p in _BASE_PRESETS}
PRESETS.update({f"tiny-{v}": fn(PRESETS["tiny"]) for v, fn in VARIANTS.items()})


def get_preset(name: str, variant: str | None = None) -> Preset:
    if name not in PRESETS:
        raise ModelLoadError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    preset = PRESETS[name]
    if variant is None:
        return preset
    if variant not in VARIANTS:
        raise ModelLoadError(f"unknown variant {variant!r}; choose one of: {', '.join(VARIANTS)}")
    return VARIANTS[variant](preset)


def make_model(
    preset: str,
    out_dir: str | Path,
    seed: int = 0,
    dtype: str | None = None,
    variant: str | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    write_weights: bool = True,
) -> Path:
    """Write a complete Hugging Face model directory for `preset` and return its path.

    The same (preset, seed, dtype) always gives byte-identical weights. write_weights=False
    writes only the config and tokenizer (for engines with load_format "dummy").
    """
    spec = get_preset(preset, variant)
    if dtype is not None:
        if dtype not in DTYPES:
            raise ModelLoadError(f"unsupported dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
        spec = dataclasses.replace(spec, dtype=dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = trained_tokenizer(spec.vocab_size, spec.model_type)
    if tokenizer.get_vocab_size() > spec.vocab_size:
        raise ModelLoadError(
            f"tokenizer has {tokenizer.get_vocab_size()} tokens, more than the preset's vocab"
        )
    save_tokenizer(tokenizer, out, spec.max_position_embeddings)
    (out / "config.json").write_text(json.dumps(hf_config(spec), indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(_generation_config(), indent=2) + "\n")

    if not write_weights:
        return out
    torch_dtype = DTYPES[spec.dtype]
    specs = [(name, shape, torch_dtype) for name, shape in parameter_shapes(spec)]
    write_safetensors(
        specs, lambda name, shape: _random_tensor(name, shape, seed, torch_dtype), out, shard_bytes
    )
    return out


def hf_config(spec: Preset) -> dict[str, Any]:
    """config.json in the classic layout (rope_theta + rope_scaling, torch_dtype), which both
    transformers 4.x and 5.x read, as do our own loaders."""
    cfg: dict[str, Any] = {
        "architectures": [spec.architecture],
        "model_type": spec.model_type,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.resolved_head_dim,
        "hidden_act": "silu",
        "vocab_size": spec.vocab_size,
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": spec.rms_norm_eps,
        "rope_theta": spec.rope_theta,
        "rope_scaling": _rope_scaling_json(spec.rope_scaling),
        "tie_word_embeddings": spec.tie_word_embeddings,
        "torch_dtype": spec.dtype,
        "bos_token_id": SPECIAL_TOKENS.index(ENDOFTEXT),
        "eos_token_id": SPECIAL_TOKENS.index(IM_END),
        "initializer_range": WEIGHT_STD,
        "use_cache": True,
    }
    if spec.model_type == "llama":
        cfg.update(attention_bias=False, mlp_bias=False)
    else:
        cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=spec.num_layers)
    return cfg


def _rope_scaling_json(rs: RopeScaling | None) -> dict[str, Any] | None:
    if rs is None:
        return None
    if rs.rope_type == "linear":
        return {"rope_type": "linear", "factor": rs.factor}
    return {
        "rope_type": rs.rope_type,
        "factor": rs.factor,
        "low_freq_factor": rs.low_freq_factor,
        "high_freq_factor": rs.high_freq_factor,
        "original_max_position_embeddings": rs.original_max_position_embeddings,
    }


def _generation_config() -> dict[str, Any]:
    # <|im_end|> ends a chat turn, <|endoftext|> a plain completion: stop on either.
    return {
        "bos_token_id": SPECIAL_TOKENS.index(ENDOFTEXT),
        "eos_token_id": [SPECIAL_TOKENS.index(IM_END), SPECIAL_TOKENS.index(ENDOFTEXT)],
        "pad_token_id": SPECIAL_TOKENS.index(ENDOFTEXT),
    }


def parameter_shapes(spec: Preset) -> list[tuple[str, tuple[int, ...]]]:
    h, hd, inter = spec.hidden_size, spec.resolved_head_dim, spec.intermediate_size
    q_out, kv_out = spec.num_heads * hd, spec.num_kv_heads * hd
    shapes: list[tuple[str, tuple[int, ...]]] = [
        ("model.embed_tokens.weight", (spec.vocab_size, h))
    ]
    for i in range(spec.num_layers):
        p = f"model.layers.{i}"
        shapes += [
            (f"{p}.input_layernorm.weight", (h,)),
            (f"{p}.self_attn.q_proj.weight", (q_out, h)),
            (f"{p}.self_attn.k_proj.weight", (kv_out, h)),
            (f"{p}.self_attn.v_proj.weight", (kv_out, h)),
        ]
        if spec.attention_bias:
            shapes += [
                (f"{p}.self_attn.q_proj.bias", (q_out,)),
                (f"{p}.self_attn.k_proj.bias", (kv_out,)),
                (f"{p}.self_attn.v_proj.bias", (kv_out,)),
            ]
        shapes += [
            (f"{p}.self_attn.o_proj.weight", (h, q_out)),
            (f"{p}.post_attention_layernorm.weight", (h,)),
            (f"{p}.mlp.gate_proj.weight", (inter, h)),
            (f"{p}.mlp.up_proj.weight", (inter, h)),
            (f"{p}.mlp.down_proj.weight", (h, inter)),
        ]
    shapes.append(("model.norm.weight", (h,)))
    if not spec.tie_word_embeddings:
        shapes.append(("lm_head.weight", (spec.vocab_size, h)))
    return shapes


def _random_tensor(
    name: str, shape: tuple[int, ...], seed: int, dtype: torch.dtype
) -> torch.Tensor:
    # One generator per tensor, seeded from (seed, name): a tensor's values do not depend on
    # which other tensors exist or the order they are made in.
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    # Sampled straight into the target dtype so a bf16 8B model never exists in float32.
    t = torch.empty(shape, dtype=dtype)
    if name.endswith("norm.weight"):
        # Norm gains near, but not exactly, 1: a loader that drops them shows up in the logits.
        return t.normal_(1.0, NORM_NOISE_STD, generator=gen)
    return t.normal_(0.0, WEIGHT_STD, generator=gen)


TensorSpec = tuple[str, tuple[int, ...], torch.dtype]


def write_safetensors(
    specs: Sequence[TensorSpec],
    make: Callable[[str, tuple[int, ...]], torch.Tensor],
    out_dir: Path,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> list[Path]:
    """Write tensors as Hugging Face does: one model.safetensors, or numbered shards plus
    model.safetensors.index.json when the total exceeds shard_bytes.

    Tensors are made one shard at a time, so peak memory is about one shard.
    """
    shards = list(_plan_shards(specs, shard_bytes))
    total = sum(_nbytes(s) for s in specs)
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map: dict[str, str] = {}
    for fname, shard in zip(names, shards, strict=True):
        tensors = {}
        for name, shape, dtype in shard:
            t = make(name, shape)
            if t.dtype != dtype or tuple(t.shape) != shape:
                raise ModelLoadError(f"tensor {name} came out {t.dtype} {tuple(t.shape)}")
            tensors[name] = t.contiguous()
            weight_map[name] = fname
        # transformers refuses safetensors files without the "pt" format tag.
        save_file(tensors, str(out_dir / fname), metadata={"format": "pt"})
        # save_file creates owner-only files; give them the directory's read bits, as for
        # every other file written here.
        os.chmod(out_dir / fname, out_dir.stat().st_mode & 0o644)
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return [out_dir / n for n in names]


def _nbytes(spec: TensorSpec) -> int:
    _, shape, dtype = spec
    return torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()


def _plan_shards(specs: Sequence[TensorSpec], shard_bytes: int) -> Iterator[list[TensorSpec]]:
    current: list[TensorSpec] = []
    size = 0
    for spec in specs:
        n = _nbytes(spec)
        if current and size + n > shard_bytes:
            yield current
            current, size = [], 0
        current.append(spec)
        size += n
    if current:
        yield current


# The Qwen2 pre-tokenization rule (digits split one by one, NFC first). transformers 5 rebuilds
# every qwen2-typed tokenizer with it whatever tokenizer.json says, so the qwen2 variant is
# trained with it too and tokenizer.json and transformers agree on every id.
QWEN2_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@functools.cache
def _trained_tokenizer_json(vocab_size: int, model_type: str) -> str:
    tok = HFTokenizer(models.BPE())
    # Byte-level BPE: every byte is in the initial alphabet, so any UTF-8 string (emoji, CJK,
    # control characters) encodes without unknowns and decodes back exactly.
    if model_type == "qwen2":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = TRAINING_TEXT.read_text(encoding="utf-8")
    tok.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    return tok.to_str()


def trained_tokenizer(vocab_size: int, model_type: str = "llama") -> HFTokenizer:
    """Byte-level BPE trained on the bundled text, up to vocab_size tokens (fewer when the
    text runs out of pairs seen twice). Cached per (size, model_type) for the process's life."""
    return HFTokenizer.from_str(_trained_tokenizer_json(vocab_size, model_type))


def save_tokenizer(tok: HFTokenizer, out_dir: Path, model_max_length: int) -> None:
    tok.save(str(out_dir / "tokenizer.json"))
    added = {
        str(tok.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "additional_special_tokens": [IM_START, IM_END],
        # Cleanup would rewrite " ." to "." and break exact round trips.
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": CHATML_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
