"""Convert a llama- or qwen2-architecture GGUF file into a float32 Hugging Face model directory.

Every tensor is dequantized with gguf's own reference code, so the safetensors hold exactly
the values llama.cpp (and transformers' GGUF loader) compute from the file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from services.engine.errors import ModelLoadError
from services.engine.gguf_layout import hf_tensor_name, unpermute_rotary
from services.model_prep.presets import DEFAULT_SHARD_BYTES, write_safetensors

ROPE_FREQS = "rope_freqs.weight"
# GGUF architecture -> Hugging Face architecture and model_type.
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
}


@dataclass(frozen=True)
class GGUFTensor:
    gguf_name: str
    hf_name: str
    shape: tuple[int, ...]  # Hugging Face (row-major) order: GGUF lists dims reversed


def convert_gguf(
    gguf_path: str | Path,
    out_dir: str | Path,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Write config.json, generation_config.json, float32 safetensors and the tokenizer
    (with its chat template) for the GGUF model at gguf_path into out_dir."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    say = progress or (lambda _msg: None)
    src = Path(gguf_path)
    if not src.is_file():
        raise ModelLoadError(f"GGUF file not found: {src}")
    try:
        reader = GGUFReader(str(src))
    except Exception as e:
        raise ModelLoadError(f"{src} is not a readable GGUF file: {e}") from None
    meta = _Metadata(reader, "")
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ModelLoadError(
            f"{src.name} has GGUF architecture {arch!r}; convertible: {', '.join(ARCHITECTURES)}"
        )
    meta = _Metadata(reader, arch)

    by_name = {t.name: t for t in reader.tensors}
    config = _hf_config(meta, by_name, arch)
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    tensors = [
        GGUFTensor(t.name, hf_tensor_name(t.name), tuple(int(d) for d in reversed(t.shape)))
        for t in reader.tensors
        if t.name != ROPE_FREQS  # folded into config.json's rope_scaling
    ]
    _check_shapes(tensors, config)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    by_hf = {t.hf_name: t for t in tensors}
    # llama.cpp permutes q/k rows for its llama converter only; qwen2's keeps HF's layout.
    permuted = arch == "llama"

    def make(hf_name: str, shape: tuple[int, ...]) -> torch.Tensor:
        t = by_hf[hf_name]
        raw = by_name[t.gguf_name]
        values = np.asarray(dequantize(raw.data, raw.tensor_type), dtype=np.float32)
        w = torch.from_numpy(values.reshape(shape).copy())
        if not permuted:
            return w
        if ".attn_q." in t.gguf_name:
            w = unpermute_rotary(w, heads)
        elif ".attn_k." in t.gguf_name:
            w = unpermute_rotary(w, kv_heads)
        return w

    say(f"dequantizing {len(tensors)} tensors to float32")
    specs = [(t.hf_name, t.shape, torch.float32) for t in tensors]
    write_safetensors(specs, make, out, shard_bytes)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps(_generation_config(meta), indent=2) + "\n"
    )
    say("converting the tokenizer")
    _save_tokenizer(src, out, meta, config["max_position_embeddings"])
    return out


class _Metadata:
    """GGUF metadata; a key written "arch.x" reads "<architecture>.x" (llama.x, qwen2.x)."""

    def __init__(self, reader: Any, arch: str) -> None:
        self._fields = reader.fields
        self._arch = arch

    def key(self, key: str) -> str:
        return self._arch + key[4:] if key.startswith("arch.") else key

    def get(self, key: str, default: Any = None) -> Any:
        field = self._fields.get(self.key(key))
        if field is None:
            return default
        value = field.contents()
        return default if value is None else value

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise ModelLoadError(f"GGUF metadata lacks {self.key(key)!r}; cannot build config.json")
        return value


def _hf_config(meta: _Metadata, tensors: dict[str, Any], arch: str) -> dict[str, Any]:
    hidden = int(meta.require("arch.embedding_length"))
    heads = meta.require("arch.attention.head_count")
    kv_heads = meta.get("arch.attention.head_count_kv", heads)
    if isinstance(heads, list) or isinstance(kv_heads, list):
        raise ModelLoadError("GGUF files with per-layer head counts are not supported")
    heads, kv_heads = int(heads), int(kv_heads)
    head_dim = (
        int(meta.get("arch.attention.key_length") or meta.get("arch.rope.dimension_count") or 0)
        or hidden // heads
    )
    embd = tensors.get("token_embd.weight")
    if embd is None:
        raise ModelLoadError("GGUF file has no token_embd.weight tensor")
    vocab = int(embd.shape[1])  # GGUF dims are reversed: [hidden, vocab]
    declared = meta.get("arch.vocab_size")
    if declared is not None and int(declared) != vocab:
        raise ModelLoadError(f"GGUF vocab_size {declared} != token_embd rows {vocab}")
    theta = float(meta.get("arch.rope.freq_base", 10000.0))
    has_bias = any(n.startswith("blk.") and n.endswith(".bias") for n in tensors)
    return {
        "architectures": [ARCHITECTURES[arch][0]],
        "model_type": ARCHITECTURES[arch][1],
        "hidden_size": hidden,
        "intermediate_size": int(meta.require("arch.feed_forward_length")),
        "num_hidden_layers": int(meta.require("arch.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "vocab_size": vocab,
        "max_position_embeddings": int(meta.get("arch.context_length", 2048)),
        "rms_norm_eps": float(meta.get("arch.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": theta,
        "rope_scaling": _rope_scaling(meta, tensors, theta, head_dim),
        # llama.cpp drops output.weight when the model ties it to the embeddings.
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": has_bias,
        "mlp_bias": False,
        "torch_dtype": "float32",
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
    }


def _rope_scaling(
    meta: _Metadata, tensors: dict[str, Any], theta: float, head_dim: int
) -> dict[str, Any] | None:
    kind = meta.get("arch.rope.scaling.type")
    if ROPE_FREQS in tensors:
        from gguf.quants import dequantize

        t = tensors[ROPE_FREQS]
        factors = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float64).reshape(-1)
        return _llama3_scaling_from_factors(factors, theta, head_dim)
    if kind in (None, "none"):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(meta.require("arch.rope.scaling.factor"))}
    raise ModelLoadError(f"GGUF rope scaling type {kind!r} is not supported; supported: linear")


def llama3_rope_factors(
    theta: float, head_dim: int, factor: float, low: float, high: float, original: int
) -> np.ndarray:
    """Per-frequency divisors exactly as llama.cpp's converter writes them to rope_freqs."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    low_wavelen, high_wavelen = original / low, original / high
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / float(freq)
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _llama3_scaling_from_factors(
    factors: np.ndarray, theta: float, head_dim: int
) -> dict[str, Any]:
    # GGUF keeps only the resulting per-frequency factors, not Llama 3's parameters. Every
    # released Llama 3.x uses low=1, high=4; search the original context length and accept
    # only an exact reproduction, since any match gives identical frequencies.
    factor = float(factors.max())
    for exp in range(6, 21):
        original = 2**exp
        expected = llama3_rope_factors(theta, head_dim, factor, 1.0, 4.0, original)
        if expected.shape == factors.shape and np.allclose(expected, factors, rtol=1e-5):
            return {
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": original,
            }
    raise ModelLoadError(
        "GGUF rope_freqs tensor does not match Llama 3 frequency scaling; cannot convert"
    )


def _check_shapes(tensors: list[GGUFTensor], config: dict[str, Any]) -> None:
    hd = config["head_dim"]
    expected_rows = {
        "q_proj": config["num_attention_heads"] * hd,
        "k_proj": config["num_key_value_heads"] * hd,
        "v_proj": config["num_key_value_heads"] * hd,
    }
    for t in tensors:
        proj = t.hf_name.split(".")[-2]
        if proj in expected_rows and t.shape[0] != expected_rows[proj]:
            raise ModelLoadError(
                f"{t.gguf_name} has {t.shape[0]} rows, expected {expected_rows[proj]} "
                "from the head counts in the GGUF metadata"
            )


def _generation_config(meta: _Metadata) -> dict[str, Any]:
    eos: list[int] = []
    for key in ("eos", "eot", "eom"):
        t = meta.get(f"tokenizer.ggml.{key}_token_id")
        if t is not None and int(t) not in eos:
            eos.append(int(t))
    gen: dict[str, Any] = {"bos_token_id": meta.get("tokenizer.ggml.bos_token_id")}
    gen["eos_token_id"] = eos[0] if len(eos) == 1 else (eos or None)
    gen["pad_token_id"] = meta.get("tokenizer.ggml.padding_token_id")
    return {k: v for k, v in gen.items() if v is not None}


def _save_tokenizer(src: Path, out: Path, meta: _Metadata, max_len: int) -> None:
    if meta.get("tokenizer.ggml.model") is None:
        raise ModelLoadError(f"{src.name} carries no tokenizer (tokenizer.ggml.*); cannot convert")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    except Exception as e:
        raise ModelLoadError(f"transformers cannot read the tokenizer in {src.name}: {e}") from None
    template = meta.get("tokenizer.chat_template")
    if template and not tok.chat_template:
        tok.chat_template = template
    tok.model_max_length = max_len
    tok.save_pretrained(str(out))
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    # These record how this one load was called, not properties of the tokenizer.
    for key in ("is_local", "local_files_only"):
        cfg.pop(key, None)
    # transformers 5 names its generic fast class TokenizersBackend, which 4.x does not know;
    # both read PreTrainedTokenizerFast as "use tokenizer.json as it is".
    if cfg.get("tokenizer_class") == "TokenizersBackend":
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
