"""A weight matrix held as 4-bit integers in groups of 32 with a scale and an offset per group,
multiplied without ever being expanded to float: GGUF's Q4_0 and Q4_1 blocks exactly. A Q8_0
matrix is two such planes (Int8Weight), its high and low nibbles.

Two kernels serve it. Ours (cpu_kernels: int4_kernel.cpp) keeps GGUF's own blocks (the nibbles,
d and m in float16, w = d q + m) and quantizes the activations to int16 per group of 32 on the
way in: integer dot products, ~1.5x torch's speed for one row and ~100x closer to the float32
product. Where ours cannot run, torch's int4 kernel computes w = (q - 8) scale + zero with
bfloat16 activations, scales and zeros. Either way a product is close to, not equal to, the
float32 one: this is the laptop's opt-in fast path, never the parity path.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from services.engine import cpu_kernels

GROUP = 32  # elements per GGUF block, and per scale of the kernels


def servable(n: int, k: int) -> bool:
    """Whether both kernels take an [n, k] weight (torch's packs rows 16 at a time; ours takes
    groups in pairs)."""
    return n % 16 == 0 and k % (2 * GROUP) == 0


@dataclass(frozen=True)
class Int4Weight:
    """w = d q + m per group of 32 (q in 0..15)."""

    shape: tuple[int, int]  # (N, K): out, in, as an F.linear weight
    packed: torch.Tensor  # ours: uint8 [N, K/2] in GGUF's block order; torch's: its own packing
    scales: torch.Tensor  # ours: float16 d [N, K/32]; torch's: bfloat16 (scale, zero) [K/32, N, 2]
    offsets: torch.Tensor | None  # ours: float16 m [N, K/32]; None with torch's kernel

    @staticmethod
    def from_groups(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> Int4Weight:
        """q: int [N, K] in 0..15; d, m: float [N, K / 32] (w = d q + m)."""
        n, k = q.shape
        if not servable(n, k) or d.shape != (n, k // GROUP) or m.shape != d.shape:
            raise ValueError(
                f"an int4 weight of shape {tuple(q.shape)} needs N % 16 == 0 and "
                f"K % {2 * GROUP} == 0"
            )
        if cpu_kernels.available("int4"):
            g = q.to(torch.uint8).view(n, k // GROUP, GROUP)
            packed = _with_slack((g[..., :16] | (g[..., 16:] << 4)).reshape(n, k // 2))
            return Int4Weight((n, k), packed, _with_slack(d.half()), _with_slack(m.half()))
        # torch's form: w = (q - 8) scale + zero
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
        sz = torch.stack([d.t(), (m + 8 * d).t()], dim=-1).to(torch.bfloat16).contiguous()
        return Int4Weight((n, k), packed, sz, None)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x: [M, K] -> float32 [M, N]."""
        if self.offsets is not None:
            return cpu_kernels.int4_linear(x.float(), self.packed, self.scales, self.offsets)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.to(torch.bfloat16), self.packed, GROUP, self.scales
        ).float()


def _with_slack(t: torch.Tensor) -> torch.Tensor:
    """t (contiguous) in a storage 64 bytes longer, zeroed: our kernel reads a row's last
    chunk of 4 groups whole, past the last row where a row's groups are not a multiple of 4."""
    flat = torch.zeros(t.numel() + 64 // t.element_size(), dtype=t.dtype)
    flat[: t.numel()] = t.reshape(-1)
    return flat[: t.numel()].view(t.shape)


@dataclass(frozen=True)
class Int8Weight:
    """Q8_0 (w = d q, q in -128..127) as two 4-bit planes of the same groups: with
    q + 128 = 16 a + b (a, b in 0..15), w = 16d a - 128d + d b. Both planes together stream a
    quarter of the float32 matrix's bytes, and it stays the file's own values (16d and -128d
    are exact in float16)."""

    high: Int4Weight
    low: Int4Weight

    @property
    def shape(self) -> tuple[int, int]:
        return self.high.shape

    @staticmethod
    def from_groups(q: torch.Tensor, d: torch.Tensor) -> Int8Weight:
        """q: int [N, K] in -128..127; d: float [N, K / 32]."""
        u = q.to(torch.int32) + 128
        high = Int4Weight.from_groups(u >> 4, 16 * d, -128 * d)
        return Int8Weight(high, Int4Weight.from_groups(u & 15, d, torch.zeros_like(d)))

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return self.high.matmul(x) + self.low.matmul(x)


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
    y = w.matmul(x.reshape(-1, shape[-1])).to(x.dtype)
    if bias is not None:
        y = y + bias
    return y.view(*shape[:-1], w.shape[0])


def q4_groups(blocks: np.ndarray, kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GGUF Q4_0 / Q4_1 rows (uint8 [N, nb * block bytes]) as (q [N, K], d, m [N, nb]) with
    w = d q + m: Q4_1's own (d, m), Q4_0's d and -8d.

    A block is d (f16) [, m (f16)], then 16 bytes whose low nibbles are elements 0..15 and
    high nibbles 16..31 (ggml's layout)."""
    head = {"Q4_0": 2, "Q4_1": 4}[kind]
    n = blocks.shape[0]
    b = np.ascontiguousarray(blocks).reshape(n, -1, head + 16)
    d = _f16(b[..., 0:2])
    qs = b[..., head:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(n, -1)
    m = _f16(b[..., 2:4]) if kind == "Q4_1" else -8 * d
    return torch.from_numpy(q.astype(np.int32)), torch.from_numpy(d), torch.from_numpy(m)


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
