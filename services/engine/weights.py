"""Load Hugging Face safetensors checkpoints (single file or sharded with an index)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from services.engine.config import ModelConfig
from services.engine.errors import ModelLoadError
from services.engine.model import LayerWeights, ModelWeights

# oneDNN's packing is chosen for a batch of this many rows; measured fastest here from 4 rows
# up (and within 15% of the best at one row) against packings for 1 row.
PACKED_ROWS = 32


def _shard_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ModelLoadError(f"{index} is not a valid safetensors index: {e}") from None
        files = sorted({model_dir / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{model_dir} lacks shards named in its index: {missing}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{model_dir} has no *.safetensors weights")
    return files


def _iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():  # noqa: SIM118 - safe_open has no __iter__
                    yield name, st.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ModelLoadError(f"cannot read {f.name} (truncated or corrupt?): {e}") from None


def load_weights(
    model_dir: str | Path, cfg: ModelConfig, dtype: torch.dtype, device: str
) -> ModelWeights:
    """Read, check shapes, fuse q/k/v and gate/up, and cast to dtype on device."""
    model_dir = Path(model_dir)
    raw: dict[str, torch.Tensor] = {}
    for name, t in _iter_tensors(_shard_files(model_dir)):
        if name.startswith("model.") or name == "lm_head.weight":
            raw[name] = t

    def take(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        t = raw.pop(name, None)
        if t is None:
            raise ModelLoadError(f"{model_dir} is missing tensor {name!r}")
        if tuple(t.shape) != shape:
            raise ModelLoadError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {shape}")
        return t.to(device=device, dtype=dtype)

    hd, d = cfg.hidden_size, cfg.head_dim
    q_out, kv_out = cfg.num_heads * d, cfg.num_kv_heads * d
    layers = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        qkv = torch.cat(
            [
                take(p + "self_attn.q_proj.weight", (q_out, hd)),
                take(p + "self_attn.k_proj.weight", (kv_out, hd)),
                take(p + "self_attn.v_proj.weight", (kv_out, hd)),
            ]
        )
        bias = None
        if cfg.attention_bias:
            bias = torch.cat(
                [
                    take(p + "self_attn.q_proj.bias", (q_out,)),
                    take(p + "self_attn.k_proj.bias", (kv_out,)),
                    take(p + "self_attn.v_proj.bias", (kv_out,)),
                ]
            )
        inter = cfg.intermediate_size
        layers.append(
            LayerWeights(
                input_norm=take(p + "input_layernorm.weight", (hd,)),
                qkv=qkv,
                qkv_bias=bias,
                o_proj=take(p + "self_attn.o_proj.weight", (hd, q_out)),
                post_norm=take(p + "post_attention_layernorm.weight", (hd,)),
                gate_up=torch.cat(
                    [
                        take(p + "mlp.gate_proj.weight", (inter, hd)),
                        take(p + "mlp.up_proj.weight", (inter, hd)),
                    ]
                ),
                down=take(p + "mlp.down_proj.weight", (hd, inter)),
            )
        )
    embed = take("model.embed_tokens.weight", (cfg.vocab_size, hd))
    if cfg.tie_word_embeddings or "lm_head.weight" not in raw:
        if not cfg.tie_word_embeddings:
            raise ModelLoadError(f"{model_dir} is missing tensor 'lm_head.weight'")
        lm_head = embed
        raw.pop("lm_head.weight", None)
    else:
        lm_head = take("lm_head.weight", (cfg.vocab_size, hd))
    norm = take("model.norm.weight", (hd,))
    leftover = [n for n in raw if "rotary_emb" not in n]
    if leftover:
        raise ModelLoadError(f"{model_dir} has unexpected tensors, e.g. {leftover[:3]}")
    return ModelWeights(embed=embed, layers=layers, norm=norm, lm_head=lm_head)


def cpu_layout(w: ModelWeights, packed: bool = True) -> ModelWeights:
    """The same weights laid out for the CPU's matmuls. packed: every matrix reordered once
    into oneDNN's blocked layout (linear() then multiplies through oneDNN): measured on 2
    cores, 2x MKL's speed at 32 rows a step and 1.35x at one row. Else (attention offload's
    model worker, which slices its q/k/v rows; a build without oneDNN) column-major: F.linear
    then hands BLAS a plain x @ W, ~1.4x the row-major form at one row. Quantized matrices
    (load_format gguf) stay as they are. The embedding lookup keeps a dense table (the tied
    head's own when not packed)."""
    packed = packed and torch.backends.mkldnn.is_available()

    def lay(t):
        if not isinstance(t, torch.Tensor):
            return t
        if packed:
            return torch.ops.mkldnn._reorder_linear_weight(t.contiguous(), PACKED_ROWS)
        return t.t().contiguous().t()

    layers = [
        LayerWeights(
            input_norm=lw.input_norm,
            qkv=lay(lw.qkv),
            qkv_bias=lw.qkv_bias,
            o_proj=lay(lw.o_proj),
            post_norm=lw.post_norm,
            gate_up=lay(lw.gate_up),
            down=lay(lw.down),
        )
        for lw in w.layers
    ]
    lm_head = lay(w.lm_head)
    embed = lm_head if w.embed is w.lm_head and not packed else w.embed
    return ModelWeights(embed=embed, layers=layers, norm=w.norm, lm_head=lm_head)


def random_weights(
    cfg: ModelConfig, dtype: torch.dtype, device: str, seed: int = 0, std: float = 0.02
) -> ModelWeights:
    """Random weights drawn on the device, already fused (load_format "dummy"): N(0, std)
    matrices and norm gains N(1, 0.05), the presets' distributions, without a checkpoint.
    For benchmarks: an 8B model takes seconds here instead of minutes through files."""
    gen = torch.Generator(device=device).manual_seed(seed)
    hd, d, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    qkv_out = (cfg.num_heads + 2 * cfg.num_kv_heads) * d

    def mat(*shape: int) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=device).normal_(0.0, std, generator=gen)

    def gain() -> torch.Tensor:
        return torch.empty(hd, dtype=dtype, device=device).normal_(1.0, 0.05, generator=gen)

    layers = [
        LayerWeights(
            input_norm=gain(),
            qkv=mat(qkv_out, hd),
            qkv_bias=mat(qkv_out) if cfg.attention_bias else None,
            o_proj=mat(hd, cfg.num_heads * d),
            post_norm=gain(),
            gate_up=mat(2 * inter, hd),
            down=mat(hd, inter),
        )
        for _ in range(cfg.num_layers)
    ]
    embed = mat(cfg.vocab_size, hd)
    lm_head = embed if cfg.tie_word_embeddings else mat(cfg.vocab_size, hd)
    return ModelWeights(embed=embed, layers=layers, norm=gain(), lm_head=lm_head)
