"""The Llama-family decoder (Llama 2/3/3.x, Mistral, Qwen2) over a flat batch of tokens.

Tokens of all sequences in a step are concatenated ([N, hidden]); the attention backend knows
where each sequence starts. q/k/v and gate/up projections are fused into one matmul each.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from services.engine.attention import AttentionBackend, AttentionMetadata
from services.engine.config import ModelConfig
from services.engine.kv_cache import KVCache
from services.engine.rope import RotaryEmbedding


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [hidden]
    qkv: torch.Tensor  # [(H + 2 Hkv) * D, hidden]
    qkv_bias: torch.Tensor | None  # [(H + 2 Hkv) * D]
    o_proj: torch.Tensor  # [hidden, H * D]
    post_norm: torch.Tensor  # [hidden]
    gate_up: torch.Tensor  # [2 * inter, hidden]
    down: torch.Tensor  # [hidden, inter]


@dataclass
class ModelWeights:
    embed: torch.Tensor  # [V, hidden]
    layers: list[LayerWeights]
    norm: torch.Tensor  # [hidden]
    lm_head: torch.Tensor  # [V, hidden]; the same tensor as embed when tied


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalize in float32 and cast back before the weight, as transformers does.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class LlamaModel:
    def __init__(
        self,
        cfg: ModelConfig,
        weights: ModelWeights,
        backend: AttentionBackend,
        max_len: int,
        dtype: torch.dtype,
        device: str,
    ) -> None:
        self.cfg = cfg
        self.w = weights
        self.backend = backend
        self.rope = RotaryEmbedding(cfg, max_len, dtype, device)
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_cache: KVCache,
        logits_indices: torch.Tensor | None,
    ) -> torch.Tensor:
        """input_ids, positions: [N]. Returns logits [M, V] for the rows in logits_indices (all
        N rows when None), in float32."""
        cfg = self.cfg
        h = F.embedding(input_ids, self.w.embed)  # [N, hidden]
        for i, lw in enumerate(self.w.layers):
            x = rms_norm(h, lw.input_norm, cfg.rms_norm_eps)
            qkv = F.linear(x, lw.qkv, lw.qkv_bias)  # [N, (H + 2Hkv) * D]
            q, k, v = qkv.split((self.q_size, self.kv_size, self.kv_size), dim=-1)
            q = q.view(-1, cfg.num_heads, cfg.head_dim)
            k = k.view(-1, cfg.num_kv_heads, cfg.head_dim)
            v = v.view(-1, cfg.num_kv_heads, cfg.head_dim)
            q, k = self.rope(positions, q, k)
            k_cache, v_cache = kv_cache.layer(i)
            attn, _ = self.backend.forward(q, k, v, k_cache, v_cache, meta)
            h = h + F.linear(attn.flatten(1), lw.o_proj)
            x = rms_norm(h, lw.post_norm, cfg.rms_norm_eps)
            gate, up = F.linear(x, lw.gate_up).chunk(2, dim=-1)
            h = h + F.linear(F.silu(gate) * up, lw.down)
        if logits_indices is not None:
            h = h[logits_indices]
        h = rms_norm(h, self.w.norm, cfg.rms_norm_eps)
        return F.linear(h, self.w.lm_head).float()  # [M, V]
