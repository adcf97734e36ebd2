"""Load a model's weights from the GGUF file it was pulled from, keeping its quantized blocks
(Q4_0, Q4_1; Q8_0 as two 4-bit planes) as they are for the int4 kernel (load_format "gguf": the
laptop's opt-in quantized path).

Any other tensor type (F32, K-quants, ...) is dequantized with gguf's reference code into
float32, as the converter does; a fused matrix (q/k/v, gate/up) stays quantized only when all of
its parts are of one kind. The embedding lookup always reads a float32 table; a tied LM head
multiplies by the file's own blocks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from services.engine.config import ModelConfig
from services.engine.errors import ModelLoadError
from services.engine.gguf_layout import hf_tensor_name, unpermute_rotary
from services.engine.int4_weight import (
    Int4Weight,
    Int8Weight,
    QuantWeight,
    q4_groups,
    q8_groups,
    servable,
)
from services.engine.model import LayerWeights, ModelWeights

FOUR_BIT = {"Q4_0", "Q4_1"}


def gguf_file(model_dir: Path) -> Path:
    files = sorted((model_dir / "gguf").glob("*.gguf"))
    if len(files) != 1:
        raise ModelLoadError(
            f"{model_dir} has {len(files)} GGUF files in gguf/ (needs exactly one): load_format "
            "'gguf' serves the file `splitserve models pull` keeps beside the converted weights"
        )
    return files[0]


class _GGUFTensors:
    def __init__(self, path: Path, cfg: ModelConfig) -> None:
        from gguf import GGUFReader

        try:
            reader = GGUFReader(str(path))
        except Exception as e:
            raise ModelLoadError(f"{path} is not a readable GGUF file: {e}") from None
        arch = reader.fields.get("general.architecture")
        arch_name = bytes(arch.parts[arch.data[0]]).decode() if arch is not None else ""
        # llama.cpp permutes q/k rows for its llama converter only; qwen2's keeps HF's layout.
        self.permuted = arch_name == "llama"
        self.heads = {"q_proj": cfg.num_heads, "k_proj": cfg.num_kv_heads}
        self.by_hf: dict[str, Any] = {
            hf_tensor_name(t.name): t for t in reader.tensors if t.name != "rope_freqs.weight"
        }
        self.path = path

    def _get(self, name: str, shape: tuple[int, ...]) -> Any:
        t = self.by_hf.get(name)
        if t is None:
            raise ModelLoadError(f"{self.path.name} is missing tensor {name!r}")
        if tuple(int(d) for d in reversed(t.shape)) != shape:
            raise ModelLoadError(f"{self.path.name}: {name!r} is not of shape {shape}")
        return t

    def _unpermute(self, name: str, x: torch.Tensor) -> torch.Tensor:
        proj = name.split(".")[-2]
        if self.permuted and proj in self.heads:
            return unpermute_rotary(x, self.heads[proj])
        return x

    def kind(self, name: str, shape: tuple[int, ...]) -> str:
        return self._get(name, shape).tensor_type.name

    def dense(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        from gguf.quants import dequantize

        t = self._get(name, shape)
        values = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        return self._unpermute(name, torch.from_numpy(values.reshape(shape).copy()))

    def groups(self, name: str, shape: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
        """(q, scale, zero) of 4-bit blocks, (q, d) of Q8_0's; rows in HF's order."""
        t = self._get(name, shape)
        kind = t.tensor_type.name
        g = q8_groups(t.data) if kind == "Q8_0" else q4_groups(t.data, kind)
        return tuple(self._unpermute(name, x) for x in g)

    def matrix(self, parts: list[tuple[str, tuple[int, int]]]) -> torch.Tensor | QuantWeight:
        """The parts' rows stacked: 4-bit when every part is Q4_0 or Q4_1, two 4-bit planes when
        every part is Q8_0, else float32 (laid out with the rest by weights.cpu_layout)."""
        kinds = {self.kind(n, s) for n, s in parts}
        rows = sum(s[0] for _, s in parts)
        served = Int8Weight if kinds == {"Q8_0"} else Int4Weight if kinds <= FOUR_BIT else None
        if served is not None and servable(rows, parts[0][1][1]):
            cols = [torch.cat(c) for c in zip(*(self.groups(n, s) for n, s in parts), strict=True)]
            return served.from_groups(*cols)
        return torch.cat([self.dense(n, s) for n, s in parts])


def load_gguf_weights(model_dir: str | Path, cfg: ModelConfig) -> ModelWeights:
    """The weights of model_dir's gguf/ file, float32 where not 4-bit, on the CPU."""
    g = _GGUFTensors(gguf_file(Path(model_dir)), cfg)
    hd, d, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q_out, kv_out = cfg.num_heads * d, cfg.num_kv_heads * d
    layers = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        a, m = p + "self_attn.", p + "mlp."
        bias = None
        if cfg.attention_bias:
            bias = torch.cat(
                [g.dense(a + "q_proj.bias", (q_out,)), g.dense(a + "k_proj.bias", (kv_out,)),
                 g.dense(a + "v_proj.bias", (kv_out,))]
            )  # fmt: skip
        qkv = [(a + "q_proj.weight", (q_out, hd)), (a + "k_proj.weight", (kv_out, hd)),
               (a + "v_proj.weight", (kv_out, hd))]  # fmt: skip
        layers.append(
            LayerWeights(
                input_norm=g.dense(p + "input_layernorm.weight", (hd,)),
                qkv=g.matrix(qkv),
                qkv_bias=bias,
                o_proj=g.matrix([(a + "o_proj.weight", (hd, q_out))]),
                post_norm=g.dense(p + "post_attention_layernorm.weight", (hd,)),
                gate_up=g.matrix(
                    [(m + "gate_proj.weight", (inter, hd)), (m + "up_proj.weight", (inter, hd))]
                ),
                down=g.matrix([(m + "down_proj.weight", (hd, inter))]),
            )
        )
    embed = g.dense("model.embed_tokens.weight", (cfg.vocab_size, hd))
    if "lm_head.weight" in g.by_hf:
        lm_head = g.matrix([("lm_head.weight", (cfg.vocab_size, hd))])
    elif cfg.tie_word_embeddings:
        lm_head = g.matrix([("model.embed_tokens.weight", (cfg.vocab_size, hd))])
    else:
        raise ModelLoadError(f"{g.path.name} is missing tensor 'lm_head.weight'")
    return ModelWeights(embed, layers, g.dense("model.norm.weight", (hd,)), lm_head)
