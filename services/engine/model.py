"""The Llama-family decoder (Llama 2/3/3.x, Mistral, Qwen2) over a flat batch of tokens.

Tokens of all sequences in a step are concatenated ([N, hidden]); the attention backend knows
where each sequence starts. q/k/v and gate/up projections are fused into one matmul each.

Two forward paths compute the same function: the reference one in plain torch (CPU, and the
GPU's "torch" kernels), and the fused one on CUDA (fused_ops: RMSNorm with the residual add,
RoPE with the KV write, SiLU-mul; the backend's `attend` over a cache already written).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from services.engine.attention import AttentionBackend, AttentionMetadata
from services.engine.config import ModelConfig
from services.engine.int4_weight import QuantWeight, linear
from services.engine.kv_cache import KVCache
from services.engine.rope import RotaryEmbedding, cos_sin_table


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [hidden]
    # Matrices are F.linear weights; a QuantWeight only on the CPU's reference path (load_format
    # "gguf"), which multiplies through linear().
    qkv: torch.Tensor | QuantWeight  # [(H + 2 Hkv) * D, hidden]
    qkv_bias: torch.Tensor | None  # [(H + 2 Hkv) * D]
    o_proj: torch.Tensor | QuantWeight  # [hidden, H * D]
    post_norm: torch.Tensor  # [hidden]
    gate_up: torch.Tensor | QuantWeight  # [2 * inter, hidden]
    down: torch.Tensor | QuantWeight  # [hidden, inter]


@dataclass
class ModelWeights:
    embed: torch.Tensor  # [V, hidden]
    layers: list[LayerWeights]
    norm: torch.Tensor  # [hidden]
    lm_head: torch.Tensor | QuantWeight  # [V, hidden]; the same tensor as embed when tied (float)


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
        fused: bool = False,
    ) -> None:
        self.cfg = cfg
        self.w = weights
        self.backend = backend
        self.fused = fused
        self.rope = RotaryEmbedding(cfg, max_len, dtype, device)
        # fused path: float32 [max_len, D] of cos then sin of the D/2 angles
        self.cos_sin = cos_sin_table(cfg, max_len, device) if fused else None
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
        if self.fused:
            return self._forward_fused(input_ids, positions, meta, kv_cache, logits_indices)
        cfg = self.cfg
        h = F.embedding(input_ids, self.w.embed)  # [N, hidden]
        cos_sin = self.rope.at(positions)
        for i, lw in enumerate(self.w.layers):
            x = rms_norm(h, lw.input_norm, cfg.rms_norm_eps)
            qkv = linear(x, lw.qkv, lw.qkv_bias)  # [N, (H + 2Hkv) * D]
            q, k, v = qkv.split((self.q_size, self.kv_size, self.kv_size), dim=-1)
            q = q.view(-1, cfg.num_heads, cfg.head_dim)
            k = k.view(-1, cfg.num_kv_heads, cfg.head_dim)
            v = v.view(-1, cfg.num_kv_heads, cfg.head_dim)
            q, k = self.rope.apply(cos_sin, q, k)
            k_cache, v_cache = kv_cache.layer(i)
            if meta.dist is not None:
                attn = meta.dist.attend(i, q, k, v, k_cache, v_cache)
            else:
                attn, _ = self.backend.forward(q, k, v, k_cache, v_cache, meta)
            h = h + linear(attn.flatten(1), lw.o_proj)
            x = rms_norm(h, lw.post_norm, cfg.rms_norm_eps)
            gate, up = linear(x, lw.gate_up).chunk(2, dim=-1)
            h = h + linear(F.silu(gate) * up, lw.down)
        if logits_indices is not None:
            h = h[logits_indices]
        h = rms_norm(h, self.w.norm, cfg.rms_norm_eps)
        return linear(h, self.w.lm_head).float()  # [M, V]

    def _forward_fused(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_cache: KVCache,
        logits_indices: torch.Tensor | None,
    ) -> torch.Tensor:
        from services.engine import fused_ops

        cfg = self.cfg
        eps = cfg.rms_norm_eps
        h = F.embedding(input_ids, self.w.embed)  # [N, hidden]
        n = h.shape[0]
        residual = None
        for i, lw in enumerate(self.w.layers):
            x, residual = fused_ops.rms_norm(h, lw.input_norm, eps, residual)
            qkv = F.linear(x, lw.qkv, lw.qkv_bias)  # [N, (H + 2Hkv) * D]
            k_cache, v_cache = kv_cache.layer(i)
            fused_ops.rope_and_cache(
                qkv, positions, self.cos_sin, k_cache, v_cache, meta.slot_mapping,
                cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
            )  # fmt: skip
            q, k, v = qkv.split((self.q_size, self.kv_size, self.kv_size), dim=-1)
            q = q.view(n, cfg.num_heads, cfg.head_dim)
            k = k.view(n, cfg.num_kv_heads, cfg.head_dim)
            v = v.view(n, cfg.num_kv_heads, cfg.head_dim)
            if meta.dist is not None:
                attn = meta.dist.attend(i, q, k, v, k_cache, v_cache, written=True)
            else:
                attn = self.backend.attend(q, k, v, k_cache, v_cache, meta)  # [N, H, D]
            h = F.linear(attn.view(n, self.q_size), lw.o_proj)
            x, residual = fused_ops.rms_norm(h, lw.post_norm, eps, residual)
            h = F.linear(fused_ops.silu_mul(F.linear(x, lw.gate_up)), lw.down)
        if logits_indices is not None:
            h, residual = h[logits_indices], residual[logits_indices]
        x, _ = fused_ops.rms_norm(h, self.w.norm, eps, residual)
        return F.linear(x, self.w.lm_head).float()  # [M, V]
