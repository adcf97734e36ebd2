"""Rotary position embeddings as the Llama family defines them (rotate-half layout).

The cos/sin tables are computed in float32 the way transformers does (inv_freq * position, then
cos/sin), so positions give bit-identical angles and the parity tests hold at 1e-4.
"""

from __future__ import annotations

import math

import torch

from services.engine.config import ModelConfig, RopeScaling


def inv_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    inv_freq = 1.0 / (theta**exponents)  # [D/2]
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between
    # interpolated smoothly.
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _angles(cfg: ModelConfig, max_len: int) -> torch.Tensor:
    inv_freq = inv_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    pos = torch.arange(max_len, dtype=torch.float32)
    return pos[:, None] * inv_freq[None, :]  # [max_len, D/2]


def cos_sin_table(cfg: ModelConfig, max_len: int, device: str) -> torch.Tensor:
    """[max_len, D] float32: cos of the D/2 angles of each position, then their sin (the fused
    CUDA kernel's table; the same angles as RotaryEmbedding, never rounded to the model dtype)."""
    freqs = _angles(cfg, max_len)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(device)


class RotaryEmbedding:
    """Precomputed cos/sin tables indexed by absolute position."""

    def __init__(self, cfg: ModelConfig, max_len: int, dtype: torch.dtype, device: str) -> None:
        freqs = _angles(cfg, max_len)
        emb = torch.cat((freqs, freqs), dim=-1)  # [max_len, D]
        self.cos = emb.cos().to(dtype=dtype, device=device)
        self.sin = emb.sin().to(dtype=dtype, device=device)

    def __call__(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [N]; q: [N, H, D]; k: [N, Hkv, D]
        return self.apply(self.at(positions), q, k)

    def at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of the positions, [N, 1, D] each: looked up once per step, not per layer."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)

    @staticmethod
    def apply(
        cos_sin: tuple[torch.Tensor, torch.Tensor], q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = cos_sin
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin

    def rotate(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """One of q or k alone (attention offload sends q before k exists), as __call__ does."""
        cos, sin = self.at(positions)
        return x * cos + _rotate_half(x) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
