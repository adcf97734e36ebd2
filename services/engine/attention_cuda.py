"""The CUDA attention backend: a paged decode kernel (Triton) and paged prefill (Triton, one
launch per layer: prefill_attention_cuda.py; torch SDPA per chunk where no plan was made).

Decode is split-KV ("flash decoding"): stage 1 runs one program per (sequence, KV head, split),
each over a contiguous run of the context, reading K/V rows through the block table and keeping
all query heads of its group in one tile, so every K/V byte is read once per step; stage 2
merges the splits by their log-sum-exp. The split count is fixed per launch (so a CUDA graph
can hold it) and context lengths are read on the device, so one graph serves any lengths.

Without a plan, prefill with no cached prefix is causal attention over the chunk's own K/V:
SDPA's flash kernel (GQA native). A chunk that continues a cached context gathers its context's
blocks and runs SDPA's memory-efficient kernel with the offset causal mask.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from services.engine.attention import AttentionMetadata, gather_blocks
from services.engine.attention_cpu import TorchAttentionBackend, _offset_causal_mask
from services.engine.fused_ops import HAS_TRITON
from services.engine.prefill_attention_cuda import paged_prefill_attention

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _decode_split_kernel(
        Q, K, V, Table, Lens, Part,
        stride_qb, stride_qh, stride_tb, stride_slot,
        stride_ob, stride_oh, stride_os,
        scale,
        G: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
        BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0).to(tl.int64)
        kvh = tl.program_id(1)
        sp = tl.program_id(2)
        length = tl.load(Lens + b)
        # Each split covers a whole number of BLOCK_N tiles; trailing splits may be empty.
        per_split = tl.cdiv(tl.cdiv(length, SPLITS), BLOCK_N) * BLOCK_N
        start = sp * per_split
        end = tl.minimum(start + per_split, length)

        g = tl.arange(0, BLOCK_H)
        gmask = g < G
        heads = kvh * G + g
        d = tl.arange(0, D)
        q = tl.load(
            Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
            mask=gmask[:, None],
            other=0.0,
        )  # fmt: skip  [BLOCK_H, D]
        m = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_sum = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, D], tl.float32)
        for n0 in range(start, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            nmask = n < end
            page = tl.load(Table + b * stride_tb + n // PAGE, mask=nmask, other=0)
            row = (page.to(tl.int64) * PAGE + n % PAGE) * stride_slot + kvh * D
            k = tl.load(K + row[:, None] + d[None, :], mask=nmask[:, None], other=0.0)
            if IEEE:  # noqa: SIM108 - a constexpr branch, resolved at compile time
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(nmask[None, :], s * scale, float("-inf"))  # [BLOCK_H, BLOCK_N]
            m_new = tl.maximum(m, tl.max(s, axis=1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m - m_new)
            l_sum = l_sum * alpha + tl.sum(p, axis=1)
            v = tl.load(V + row[:, None] + d[None, :], mask=nmask[:, None], other=0.0)
            if IEEE:
                pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m = m_new
        nonempty = l_sum > 0
        out = acc / tl.where(nonempty, l_sum, 1.0)[:, None]
        lse = tl.where(nonempty, m + tl.log(tl.where(nonempty, l_sum, 1.0)), float("-inf"))
        # Part: [B, H, SPLITS, D + 1] float32, the split's lse in the last column
        o_base = Part + b * stride_ob + heads * stride_oh + sp * stride_os
        tl.store(o_base[:, None] + d[None, :], out, mask=gmask[:, None])
        tl.store(o_base + D, lse, mask=gmask)

    @triton.jit
    def _decode_merge_kernel(
        Part, Out, Lse,
        stride_ob, stride_oh, stride_os, stride_b, stride_h,
        D: tl.constexpr, SPLITS: tl.constexpr, SPLITS_P: tl.constexpr, H: tl.constexpr,
        WITH_LSE: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        s = tl.arange(0, SPLITS_P)
        smask = s < SPLITS
        base = b * stride_ob + h * stride_oh
        lse = tl.load(Part + base + s * stride_os + D, mask=smask, other=float("-inf"))
        top = tl.max(lse, axis=0)
        top = tl.where(top > float("-inf"), top, 0.0)  # all splits empty: every weight is 0
        w = tl.where(smask, tl.exp(lse - top), 0.0)
        total = tl.sum(w, axis=0)
        d = tl.arange(0, D)
        parts = tl.load(
            Part + base + s[:, None] * stride_os + d[None, :], mask=smask[:, None], other=0.0
        )  # fmt: skip  [SPLITS_P, D]
        out = tl.sum(parts * w[:, None], axis=0) / tl.where(total > 0, total, 1.0)
        tl.store(Out + b * stride_b + h * stride_h + d, out.to(Out.dtype.element_ty))
        if WITH_LSE:  # the whole context's log-sum-exp, for DistAttention's merge
            lse_all = tl.where(
                total > 0, top + tl.log(tl.where(total > 0, total, 1.0)), float("-inf")
            )
            tl.store(Lse + b * H + h, lse_all)


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_splits(batch: int, num_kv_heads: int, device: torch.device) -> int:
    """Enough splits that stage 1 fills the GPU about four times over, 1 to 32."""
    target = 4 * _num_sms(device.index or 0)
    return max(1, min(32, -(-target // max(1, batch * num_kv_heads))))


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    scale: float,
    out: torch.Tensor | None = None,
    splits: int | None = None,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query token per sequence over its paged context.

    q: [B, H, D] (rows may be strided); caches: [slots, Hkv, D]; block_table: [B, W] int32;
    context_lens: [B] int32 (0: the row is padding, its output is 0). Returns [B, H, D].
    lse: a float32 [B, H] buffer to receive each head's log-sum-exp (-inf for no context).
    """
    return paged_decode_attention_pools(
        q, [(k_cache, v_cache, block_table, context_lens)], block_size, scale, out, splits, lse
    )


def paged_decode_attention_pools(
    q: torch.Tensor,
    pools: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
    block_size: int,
    scale: float,
    out: torch.Tensor | None = None,
    splits: int | None = None,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query token per sequence over context held in several paged pools of one layout
    (the engine's own and lenders' mapped on this device): per pool (k cache, v cache, block
    table, keys seen), each row's keys there. Each pool's splits land in one buffer and one
    merge makes the whole attention: no partials to merge afterwards."""
    batch, num_heads, head_dim = q.shape
    num_kv = pools[0][0].shape[1]
    group = num_heads // num_kv
    if out is None:
        out = torch.empty((batch, num_heads, head_dim), dtype=q.dtype, device=q.device)
    splits = splits or num_splits(batch, num_kv, q.device)
    total = splits * len(pools)
    part = torch.empty(
        (batch, num_heads, total, head_dim + 1), dtype=torch.float32, device=q.device
    )  # the last column of each split holds its lse: one buffer, one allocation
    ieee = q.dtype == torch.float32
    for j, (k_cache, v_cache, block_table, context_lens) in enumerate(pools):
        view = part[:, :, j * splits : (j + 1) * splits]  # same strides, its splits' offset
        _decode_split_kernel[(batch, num_kv, splits)](
            q, k_cache, v_cache, block_table, context_lens, view,
            q.stride(0), q.stride(1), block_table.stride(0), k_cache.stride(0),
            part.stride(0), part.stride(1), part.stride(2),
            scale,
            G=group, BLOCK_H=max(16, triton.next_power_of_2(group)), D=head_dim,
            PAGE=block_size, BLOCK_N=64 if head_dim <= 128 else 32, SPLITS=splits, IEEE=ieee,
            num_warps=4, num_stages=2,
        )  # fmt: skip
    _decode_merge_kernel[(batch, num_heads)](
        part, out, lse if lse is not None else part,
        part.stride(0), part.stride(1), part.stride(2), out.stride(0), out.stride(1),
        D=head_dim, SPLITS=total, SPLITS_P=triton.next_power_of_2(total), H=num_heads,
        WITH_LSE=lse is not None, num_warps=1,
    )  # fmt: skip
    return out


class CudaAttentionBackend:
    """AttentionBackend on CUDA: paged decode kernel, SDPA prefill.

    `forward` is the protocol (write, then attend); the fused model path writes K/V in its RoPE
    kernel and calls `attend`. Asked for the log-sum-exp, it defers to the reference backend.
    """

    def __init__(self) -> None:
        self._reference = TorchAttentionBackend()

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        return_lse: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if return_lse or (meta.num_decode and meta.decode_context_lens is None):
            return self._reference.forward(q, k, v, k_cache, v_cache, meta, return_lse)
        slots = meta.slot_mapping.long()
        k_cache.index_copy_(0, slots, k)
        v_cache.index_copy_(0, slots, v)
        return self.attend(q, k, v, k_cache, v_cache, meta), None

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Attention over caches that already hold this step's K/V. q: [N, H, D] (rows may be
        strided); k, v: [N, Hkv, D]; caches: [slots, Hkv, D]. Returns [N, H, D], contiguous."""
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        nd = meta.num_decode
        if nd:
            assert meta.decode_block_table is not None and meta.decode_context_lens is not None
            paged_decode_attention(
                q[:nd], k_cache, v_cache, meta.decode_block_table, meta.decode_context_lens,
                meta.block_size, meta.scale, out=out[:nd],
            )  # fmt: skip
        if meta.prefill_plan is not None:
            paged_prefill_attention(
                q, k_cache, v_cache, meta.prefill_plan, meta.block_size, meta.scale, out
            )
            return out
        for p in meta.prefills:
            sl = slice(p.query_start, p.query_start + p.num_query)
            qs = q[sl].transpose(0, 1).unsqueeze(0)  # [1, H, T, D]
            if p.block_table is None:  # the chunk is the whole context: flash, GQA native
                o = F.scaled_dot_product_attention(
                    qs,
                    k[sl].transpose(0, 1).unsqueeze(0),  # [1, Hkv, T, D]
                    v[sl].transpose(0, 1).unsqueeze(0),
                    is_causal=True,
                    scale=meta.scale,
                    enable_gqa=True,
                )
            else:  # continues a cached context: gathered context, offset causal mask
                group = q.shape[1] // k.shape[1]
                ctx = slice(0, p.seq_len)
                ks = gather_blocks(k_cache, p.block_table, meta.block_size)[ctx]  # [S, Hkv, D]
                vs = gather_blocks(v_cache, p.block_table, meta.block_size)[ctx]
                ks = ks.repeat_interleave(group, dim=1).transpose(0, 1).unsqueeze(0)  # [1,H,S,D]
                vs = vs.repeat_interleave(group, dim=1).transpose(0, 1).unsqueeze(0)
                mask = _offset_causal_mask(p.num_query, p.seq_len, q.device)
                o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=meta.scale)
            out[sl] = o.squeeze(0).transpose(0, 1)
        return out
