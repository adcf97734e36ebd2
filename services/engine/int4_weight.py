"""A weight matrix held as 4-bit integers in groups of 32 with a scale and an offset per group,
multiplied without ever being expanded to float: GGUF's Q4_0 and Q4_1 blocks exactly, served by
torch's int4 CPU kernel. A Q8_0 matrix is two such planes (Int8Weight), its high and low nibbles.

The kernel computes w = (q - 8) * scale + zero with bfloat16 activations, scales and zeros, so
a product is close to, not equal to, the float32 one: this is the laptop's opt-in fast path,
never the parity path. A Q4_1 block's (d, m) become scale d and zero m + 8d; Q4_0's d and -8 offset
become scale d and zero 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

GROUP = 32  # elements per GGUF block, and per scale of the kernel


def servable(n: int, k: int) -> bool:
    """Whether the kernel takes an [n, k] weight (it packs rows 16 at a time)."""
    return n % 16 == 0 and k % GROUP == 0


@dataclass(frozen=True)
class Int4Weight:
    packed: torch.Tensor  # uint8, the kernel's own packing of q [N, K]
    scales_zeros: torch.Tensor  # bfloat16 [K / 32, N, 2]
    shape: tuple[int, int]  # (N, K): out, in, as an F.linear weight

    @staticmethod
    def from_groups(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> Int4Weight:
        """q: int [N, K] in 0..15; scale, zero: float [N, K / 32]."""
        n, k = q.shape
        if not servable(n, k) or scale.shape != (n, k // GROUP) or zero.shape != scale.shape:
            raise ValueError(
                f"an int4 weight of shape {tuple(q.shape)} needs N % 16 == 0 and K % {GROUP} == 0"
            )
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
        sz = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()
        return Int4Weight(packed, sz, (n, k))

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        # x: [M, K] bfloat16 -> [M, N] bfloat16
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, GROUP, self.scales_zeros)


@dataclass(frozen=True)
class Int8Weight:
    """Q8_0 (w = d * q, q in -128..127) as two 4-bit planes of the same groups: with
    q + 128 = 16 a + b (a, b in 0..15), w = 16d (a - 8) + 8d + d (b - 8). Both planes together
    stream a quarter of the float32 matrix's bytes, and it stays the file's own values."""

    high: Int4Weight
    low: Int4Weight

    @property
    def shape(self) -> tuple[int, int]:
        return self.high.shape

    @staticmethod
    def from_groups(q: torch.Tensor, d: torch.Tensor) -> Int8Weight:
        """q: int [N, K] in -128..127; d: float [N, K / 32]."""
        u = q.to(torch.int32) + 128
        high = Int4Weight.from_groups(u >> 4, 16 * d, 8 * d)
        return Int8Weight(high, Int4Weight.from_groups(u & 15, d, torch.zeros_like(d)))

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return self.high.matmul(x).float() + self.low.matmul(x).float()


QuantWeight = Int4Weight | Int8Weight


def linear(
    x: torch.Tensor, w: torch.Tensor | QuantWeight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """F.linear over a float matrix (dense, or packed for oneDNN: weights.cpu_layout) or a
    quantized one (x and the result in x's dtype)."""
    if isinstance(w, torch.Tensor):
        if w.is_mkldnn:
            return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")
        return F.linear(x, w, bias)
    shape = x.shape
    y = w.matmul(x.reshape(-1, shape[-1]).to(torch.bfloat16)).to(x.dtype)
    if bias is not None:
        y = y + bias
    return y.view(*shape[:-1], w.shape[0])


def q4_groups(blocks: np.ndarray, kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GGUF Q4_0 / Q4_1 rows (uint8 [N, nb * block bytes]) as (q [N, K], scale, zero [N, nb]).

    A block is d (f16) [, m (f16)], then 16 bytes whose low nibbles are elements 0..15 and
    high nibbles 16..31 (ggml's layout)."""
    head = {"Q4_0": 2, "Q4_1": 4}[kind]
    n = blocks.shape[0]
    b = np.ascontiguousarray(blocks).reshape(n, -1, head + 16)
    d = _f16(b[..., 0:2])
    qs = b[..., head:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(n, -1)
    if kind == "Q4_1":
        m = _f16(b[..., 2:4])
        zero = m + 8 * d
    else:
        zero = np.zeros_like(d)
    return torch.from_numpy(q.astype(np.int32)), torch.from_numpy(d), torch.from_numpy(zero)


def q8_groups(blocks: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """GGUF Q8_0 rows (uint8 [N, nb * 34]: d (f16), then 32 int8) as (q [N, K], d [N, nb])."""
    n = blocks.shape[0]
    b = np.ascontiguousarray(blocks).reshape(n, -1, 34)
    d = _f16(b[..., 0:2])
    q = b[..., 2:].copy().view(np.int8).reshape(n, -1)
    return torch.from_numpy(q.astype(np.int32)), torch.from_numpy(d)


def _f16(two_bytes: np.ndarray) -> np.ndarray:
    """A block's little-endian float16 field ([..., 2] bytes) as float32 [...]."""
    return two_bytes.copy().view(np.float16)[..., 0].astype(np.float32)
