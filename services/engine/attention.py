"""The attention-backend seam: what a backend is given and what it returns.

A batch is laid out as decode sequences first (one query token each), then prefill chunks.
Backends write the step's new K/V into the paged cache and attend over each sequence's whole
context. On request they also return the per-head log-sum-exp of the scores, which is what lets
partial attentions over disjoint KV segments (attention offload, DistAttention) be merged
exactly (services/engine/partial_attention.py: `merge_into`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from services.engine.dist_attention import DistStep
    from services.engine.prefill_attention_cuda import PrefillPlan


@dataclass(frozen=True)
class PrefillSeq:
    """One prefill chunk: queries are tokens [start, start + num_query) of a context of seq_len."""

    query_start: int  # offset of its first token in the flat batch
    num_query: int
    seq_len: int  # context length including this chunk
    block_table: torch.Tensor | None  # [ceil(seq_len / bs)] blocks of the whole context; None
    # when the chunk is the whole context (no cached prefix), so it attends over its own K/V


@dataclass(frozen=True)
class AttentionMetadata:
    num_decode: int  # decode sequences come first in the flat batch, one token each
    slot_mapping: torch.Tensor  # [N] cache slot each new token's K/V is written to
    decode_block_table: torch.Tensor | None  # [num_decode, max_blocks], padded with block 0
    decode_mask: torch.Tensor | None  # [num_decode, 1, 1, max_blocks * bs] True where real
    prefills: tuple[PrefillSeq, ...]
    scale: float
    block_size: int
    # Context length of each decode sequence [num_decode]. CUDA backend: int32 (0: a padding
    # row of a CUDA graph), its decode_block_table int32 and decode_mask None. CPU: int64, for
    # the paged decode kernel (the mask stays for SDPA's path).
    decode_context_lens: torch.Tensor | None = None
    # A step with KV held outside the local pool (DistAttention): the model asks it for every
    # layer's attention instead of the backend; slot_mapping is -1 for tokens stored remotely.
    dist: DistStep | None = None
    # CUDA backend: every prefill chunk for one kernel launch (prefill_attention_cuda.py)
    prefill_plan: PrefillPlan | None = None


def gather_blocks(cache: torch.Tensor, table: torch.Tensor, block_size: int) -> torch.Tensor:
    """Contexts by block table: cache [num_slots, Hkv, D], table [..., nblk] -> [..., nblk*bs,
    Hkv, D]. Selecting whole blocks is several times faster than selecting slot by slot."""
    blocks = cache.view(-1, block_size, *cache.shape[1:]).index_select(0, table.reshape(-1))
    return blocks.view(*table.shape[:-1], table.shape[-1] * block_size, *cache.shape[1:])


class AttentionBackend(Protocol):
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
        """Write k/v at meta.slot_mapping, then attend.

        q: [N, H, D]; k, v: [N, Hkv, D]; k_cache, v_cache: [num_slots, Hkv, D] (written in place).
        Returns out [N, H, D] and, if return_lse, lse [N, H] in float32 (natural log).
        """
        ...
