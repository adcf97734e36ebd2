"""Reference attention backend in plain torch; the CPU default and the GPU path's oracle.

Decode sequences are attended straight over the paged cache by the engine's own CPU kernel
(cpu_kernels: decode_attention_cpu.cpp) where it runs and the step has their context lengths;
otherwise in one batched SDPA call over their gathered, padded contexts.
A prefill chunk with no cached prefix attends over its own K/V with a causal mask (no gather);
one that continues a cached context gathers its slots and uses an offset causal mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from services.engine import cpu_kernels
from services.engine.attention import AttentionMetadata, gather_blocks


class TorchAttentionBackend:
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
        # q: [N, H, D]; k, v: [N, Hkv, D]; caches: [num_slots, Hkv, D]
        k_cache.index_copy_(0, meta.slot_mapping, k)
        v_cache.index_copy_(0, meta.slot_mapping, v)
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device) if return_lse else None
        nd = meta.num_decode
        paged = (
            nd
            and not return_lse
            and meta.decode_context_lens is not None
            and q.device.type == "cpu"
            and q.dtype == torch.float32
            and cpu_kernels.available("attention")
        )
        if paged:
            assert meta.decode_block_table is not None and meta.decode_context_lens is not None
            out[:nd] = cpu_kernels.decode_attention(
                q[:nd], k_cache, v_cache, meta.decode_block_table, meta.decode_context_lens,
                meta.block_size, meta.scale,
            )  # fmt: skip
        elif nd:
            assert meta.decode_block_table is not None and meta.decode_mask is not None
            kc = gather_blocks(k_cache, meta.decode_block_table, meta.block_size)  # [B,L,Hkv,D]
            vc = gather_blocks(v_cache, meta.decode_block_table, meta.block_size)
            o, s = _attend(
                q[:nd].unsqueeze(2),  # [B, H, 1, D]
                kc.transpose(1, 2),  # [B, Hkv, L, D]
                vc.transpose(1, 2),
                meta.decode_mask,
                meta.scale,
                return_lse,
            )
            out[:nd] = o.squeeze(2)
            if lse is not None:
                lse[:nd] = s.squeeze(2)
        for p in meta.prefills:
            sl = slice(p.query_start, p.query_start + p.num_query)
            qs = q[sl].transpose(0, 1).unsqueeze(0)  # [1, H, T, D]
            if p.block_table is None:  # the chunk is the whole context: plain causal attention
                ks = k[sl].transpose(0, 1).unsqueeze(0)  # [1, Hkv, T, D]
                vs = v[sl].transpose(0, 1).unsqueeze(0)
                mask = None
            else:
                ctx = slice(0, p.seq_len)
                ks = gather_blocks(k_cache, p.block_table, meta.block_size)[ctx]  # [S, Hkv, D]
                vs = gather_blocks(v_cache, p.block_table, meta.block_size)[ctx]
                ks = ks.transpose(0, 1).unsqueeze(0)  # [1, Hkv, S, D]
                vs = vs.transpose(0, 1).unsqueeze(0)
                mask = _offset_causal_mask(p.num_query, p.seq_len, q.device)
            o, s = _attend(qs, ks, vs, mask, meta.scale, return_lse, causal=mask is None)
            out[sl] = o.squeeze(0).transpose(0, 1)
            if lse is not None:
                lse[sl] = s.squeeze(0).transpose(0, 1)
        return out, lse


def _offset_causal_mask(num_query: int, seq_len: int, device: torch.device) -> torch.Tensor:
    # Query i sits at absolute position seq_len - num_query + i and sees keys at positions <= it.
    qpos = torch.arange(seq_len - num_query, seq_len, device=device)[:, None]
    kpos = torch.arange(seq_len, device=device)[None, :]
    return (kpos <= qpos)[None, None]  # [1, 1, T, S]


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    return_lse: bool,
    causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    # q: [B, H, T, D]; k, v: [B, Hkv, S, D]; mask: broadcastable to [B, H, T, S], True = keep
    if not return_lse:
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True
        )
        return o, None
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # [B, H, T, S]
    if causal:
        t, s = scores.shape[-2:]
        mask = _offset_causal_mask(t, s, q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, H, T]
    probs = torch.exp(scores - lse.unsqueeze(-1)).nan_to_num(0.0)
    return torch.matmul(probs, v.float()).to(q.dtype), lse
