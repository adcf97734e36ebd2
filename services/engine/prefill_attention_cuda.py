"""Every prefill chunk of a step in one Triton launch, over the paged cache.

A step with many short prompts (IC-Cache's questions, a chat's next turn behind a cached
prefix) spent most of its time in a per-chunk loop: one SDPA call per chunk per layer, and for
a chunk behind a cached prefix a block gather, a GQA repeat and an offset causal mask besides.
Here one program takes BLOCK_M queries of one chunk and one head, and walks that chunk's
context through its block table (the cache already holds this step's K/V): causal with the
context's offset, online softmax, no gather, no mask tensor. The tile list and the tables are
built once per step on the host and cross with the step's other inputs (`fill_plan`), so each
layer costs one launch whatever the number of chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from services.engine.fused_ops import HAS_TRITON

BLOCK_M = 64

if HAS_TRITON:
    import triton.language as tl
    from triton import jit

    @jit
    def _prefill_kernel(
        Q, K, V, Out, Tiles, Seqs, Table,
        stride_qt, stride_qh, stride_ot, stride_oh, stride_slot, stride_tb,
        scale,
        G: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
        BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        tile = tl.program_id(0)
        h = tl.program_id(1)
        p = tl.load(Tiles + 2 * tile)
        m0 = tl.load(Tiles + 2 * tile + 1)
        q_start = tl.load(Seqs + 3 * p)
        q_len = tl.load(Seqs + 3 * p + 1)
        seq_len = tl.load(Seqs + 3 * p + 2)
        offset = seq_len - q_len  # keys before the chunk: the cached prefix
        kvh = h // G

        m = m0 + tl.arange(0, BLOCK)
        mmask = m < q_len
        d = tl.arange(0, D)
        rows = (q_start + m).to(tl.int64)
        q = tl.load(
            Q + rows[:, None] * stride_qt + h * stride_qh + d[None, :],
            mask=mmask[:, None],
            other=0.0,
        )  # fmt: skip  [BLOCK, D]
        m_i = tl.full([BLOCK], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK], tl.float32)
        acc = tl.zeros([BLOCK, D], tl.float32)
        last = offset + m  # the last key each query may see
        end = tl.minimum(seq_len, offset + m0 + BLOCK)
        table = Table + p.to(tl.int64) * stride_tb
        for n0 in range(0, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            nmask = n < end
            page = tl.load(table + n // PAGE, mask=nmask, other=0)
            slot = (page.to(tl.int64) * PAGE + n % PAGE) * stride_slot + kvh * D
            k = tl.load(K + slot[:, None] + d[None, :], mask=nmask[:, None], other=0.0)
            if IEEE:  # noqa: SIM108 - a constexpr branch, resolved at compile time
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            # key 0 is visible to every row, so no row's maximum stays -inf
            s = tl.where((n[None, :] <= last[:, None]) & nmask[None, :], s * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            pr = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(pr, axis=1)
            v = tl.load(V + slot[:, None] + d[None, :], mask=nmask[:, None], other=0.0)
            if IEEE:
                pv = tl.dot(pr, v.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(pr.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(
            Out + rows[:, None] * stride_ot + h * stride_oh + d[None, :],
            out.to(Out.dtype.element_ty),
            mask=mmask[:, None],
        )  # fmt: skip


@dataclass(frozen=True)
class PrefillPlan:
    """A step's prefill chunks as the kernel reads them: views of the runner's device inputs."""

    tiles: torch.Tensor  # int32 [T, 2]: (chunk, first query of the tile)
    seqs: torch.Tensor  # int32 [P, 3]: (first row in the flat batch, queries, context length)
    table: torch.Tensor  # int32 [P, W]: each chunk's context blocks, padded


def plan_space(max_tokens: int, max_seqs: int) -> int:
    """int32s the tiles and chunk rows of any step within these limits take."""
    return 2 * (max_tokens // BLOCK_M + max_seqs) + 3 * max_seqs


def fill_plan(chunks: list[tuple[int, int, int]], out: np.ndarray) -> tuple[int, int]:
    """Write the tiles then the (first row, queries, context length) rows of `chunks` into
    `out` (a host buffer of plan_space); returns where the chunk rows start and end."""
    nq = np.asarray([c[1] for c in chunks], dtype=np.int64)
    per = -(-nq // BLOCK_M)
    chunk = np.repeat(np.arange(len(chunks)), per)
    first = (np.arange(per.sum()) - np.repeat(np.cumsum(per) - per, per)) * BLOCK_M
    n_t = 2 * len(chunk)
    out[0:n_t:2] = chunk
    out[1:n_t:2] = first
    out[n_t : n_t + 3 * len(chunks)] = np.asarray(chunks, dtype=np.int32).reshape(-1)
    return n_t, n_t + 3 * len(chunks)


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    plan: PrefillPlan,
    block_size: int,
    scale: float,
    out: torch.Tensor,
) -> torch.Tensor:
    """Causal attention of every planned chunk's queries over its context (cached prefix and
    the chunk itself, both already in the caches). q: [N, H, D] (rows may be strided); caches:
    [slots, Hkv, D]; writes the chunks' rows of out [N, H, D] and returns it."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    group = num_heads // k_cache.shape[1]
    ieee = q.dtype == torch.float32
    _prefill_kernel[(plan.tiles.shape[0], num_heads)](
        q, k_cache, v_cache, out, plan.tiles, plan.seqs, plan.table,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_cache.stride(0),
        plan.table.stride(0),
        scale,
        G=group, D=head_dim, PAGE=block_size, BLOCK=BLOCK_M,
        BLOCK_N=32 if ieee or head_dim > 128 else 64, IEEE=ieee,
        num_warps=4, num_stages=2,
    )  # fmt: skip
    return out
