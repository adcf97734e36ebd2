"""Fused elementwise kernels of the CUDA path (Triton): RMSNorm with the residual add, RoPE with
the KV-cache write, SiLU-and-multiply.

Each replaces a chain of 4 to 14 eager torch kernels by one pass over its rows. Under a CUDA
graph the launch cost is gone but every kernel still reads and writes its tensors, and at decode
sizes each small kernel costs a few microseconds regardless: ~40 kernels a layer become ~9.

Rounding follows transformers where it is cheap to: RMSNorm normalizes in float32, rounds to the
model dtype, then multiplies by the weight in that dtype; SiLU rounds before the multiply. RoPE
rotates in float32 and rounds once (transformers rounds cos/sin and each product), which moves
bf16 outputs by about one unit in the last place.

Triton is imported lazily: CPU-only installs (CI) never need it.
"""

from __future__ import annotations

import functools

import torch

try:  # pragma: no cover - exercised on GPU machines only
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only torch builds ship without Triton
    HAS_TRITON = False


def triton_available(device: str | torch.device) -> bool:
    return HAS_TRITON and torch.device(device).type == "cuda"


if HAS_TRITON:

    @triton.jit
    def _rms_norm_kernel(
        X, R, W, Out, ROut,
        stride_x, stride_r, stride_o, stride_ro,
        n, eps,
        HAS_RES: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
        if HAS_RES:
            # residual + x rounded to the model dtype, as an eager bf16 add does
            r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
            tl.store(ROut + row * stride_ro + cols, x, mask=mask)
        xf = x.to(tl.float32)
        var = tl.sum(xf * xf, axis=0) / n
        y = (xf / tl.sqrt_rn(var + eps)).to(x.dtype)
        w = tl.load(W + cols, mask=mask, other=0.0)
        out = (y.to(tl.float32) * w.to(tl.float32)).to(x.dtype)
        tl.store(Out + row * stride_o + cols, out, mask=mask)

    @triton.jit
    def _rope_cache_kernel(
        QKV, Pos, CosSin, KCache, VCache, Slots,
        stride_t, stride_slot,
        H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
        HP: tl.constexpr, HKP: tl.constexpr,
    ):  # fmt: skip
        # One token: rotate its q and k heads in place (rotate-half layout), then copy k and v
        # into the cache slot (a negative slot writes nothing: padding rows of a CUDA graph).
        t = tl.program_id(0).to(tl.int64)
        half: tl.constexpr = D // 2
        i = tl.arange(0, half)
        pos = tl.load(Pos + t).to(tl.int64)
        cos = tl.load(CosSin + pos * D + i)[None, :]  # [1, D/2] float32
        sin = tl.load(CosSin + pos * D + half + i)[None, :]
        base = QKV + t * stride_t

        hq = tl.arange(0, HP)[:, None]
        mq = hq < H
        q1 = tl.load(base + hq * D + i[None, :], mask=mq, other=0.0)
        q2 = tl.load(base + hq * D + half + i[None, :], mask=mq, other=0.0)
        q1f, q2f = q1.to(tl.float32), q2.to(tl.float32)
        tl.store(base + hq * D + i[None, :], (q1f * cos - q2f * sin).to(q1.dtype), mask=mq)
        tl.store(base + hq * D + half + i[None, :], (q2f * cos + q1f * sin).to(q1.dtype), mask=mq)

        hk = tl.arange(0, HKP)[:, None]
        mk = hk < HKV
        kb = base + H * D
        k1 = tl.load(kb + hk * D + i[None, :], mask=mk, other=0.0).to(tl.float32)
        k2 = tl.load(kb + hk * D + half + i[None, :], mask=mk, other=0.0).to(tl.float32)
        r1 = (k1 * cos - k2 * sin).to(q1.dtype)
        r2 = (k2 * cos + k1 * sin).to(q1.dtype)
        tl.store(kb + hk * D + i[None, :], r1, mask=mk)
        tl.store(kb + hk * D + half + i[None, :], r2, mask=mk)

        slot = tl.load(Slots + t).to(tl.int64)
        if slot >= 0:
            d = tl.arange(0, D)[None, :]
            v = tl.load(kb + HKV * D + hk * D + d, mask=mk, other=0.0)
            dst = slot * stride_slot + hk * D
            tl.store(KCache + dst + i[None, :], r1, mask=mk)
            tl.store(KCache + dst + half + i[None, :], r2, mask=mk)
            tl.store(VCache + dst + d, v, mask=mk)

    @triton.jit
    def _silu_mul_kernel(GU, Out, stride_gu, stride_o, inter, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < inter
        g = tl.load(GU + row * stride_gu + cols, mask=mask, other=0.0)
        u = tl.load(GU + row * stride_gu + inter + cols, mask=mask, other=0.0)
        gf = g.to(tl.float32)
        s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)  # silu rounded first, as eager torch does
        tl.store(Out + row * stride_o + cols, (s.to(tl.float32) * u.to(tl.float32)).to(g.dtype),
                 mask=mask)  # fmt: skip


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@functools.cache
def _norm_warps(block: int) -> int:
    return max(1, min(16, block // 256))


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of x (or of residual + x, written back into residual). x: [N, hidden].

    Returns (normed [N, hidden], the new residual: residual + x, or x itself when None).
    """
    n_rows, n = x.shape
    out = torch.empty_like(x)
    if n_rows == 0:
        return out, x if residual is None else residual
    block = _pow2(n)
    if residual is None:
        _rms_norm_kernel[(n_rows,)](
            x, x, weight, out, x, x.stride(0), 0, out.stride(0), 0, n, eps,
            HAS_RES=False, BLOCK=block, num_warps=_norm_warps(block),
        )  # fmt: skip
        return out, x
    _rms_norm_kernel[(n_rows,)](
        x, residual, weight, out, residual,
        x.stride(0), residual.stride(0), out.stride(0), residual.stride(0), n, eps,
        HAS_RES=True, BLOCK=block, num_warps=_norm_warps(block),
    )  # fmt: skip
    return out, residual


def rope_and_cache(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> None:
    """Rotate q and k of qkv in place and write k, v to their cache slots.

    qkv: [N, (H + 2 Hkv) * D], rows contiguous; positions, slot_mapping: [N] (slot < 0: skip);
    cos_sin: [max_len, D] float32, cos of the D/2 frequencies then sin; caches: [slots, Hkv, D].
    """
    n = qkv.shape[0]
    if n == 0:
        return
    _rope_cache_kernel[(n,)](
        qkv, positions, cos_sin, k_cache, v_cache, slot_mapping,
        qkv.stride(0), k_cache.stride(0),
        H=num_heads, HKV=num_kv_heads, D=head_dim,
        HP=_pow2(num_heads), HKP=_pow2(num_kv_heads), num_warps=4,
    )  # fmt: skip


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up]: [N, 2 I] -> [N, I]."""
    n, two_i = gate_up.shape
    inter = two_i // 2
    out = torch.empty((n, inter), dtype=gate_up.dtype, device=gate_up.device)
    if n == 0:
        return out
    block = min(2048, _pow2(inter))
    _silu_mul_kernel[(n, triton.cdiv(inter, block))](
        gate_up, out, gate_up.stride(0), out.stride(0), inter, BLOCK=block, num_warps=4
    )
    return out
