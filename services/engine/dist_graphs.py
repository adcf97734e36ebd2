"""CUDA graphs of a DistAttention decode step (a decoder whose sequences' KV is split between
its own pool and holders on its GPU's host, with shared buffers).

Per layer the decoder's host work is three launches and a message: graph i (layer i-1's merge
of the local and remote partials, its o projection and FFN; layer i's q, k, v with RoPE, the
local rows' k, v written to the local cache, each holder's rows copied into its shared
buffer), the send, then the local partial's graph (the paged decode kernel over the local
blocks, with its log-sum-exp) while the holders attend theirs. Op by op the same layer is
~40 launches, and the host, waiting on a round trip every layer, can never run ahead of the
GPU to hide them.

Decode batches only, padded to a captured size. A graph set belongs to one list of holders and
their current buffers. Which rows go to which holder and which rows a holder's answer fills
are index buffers refilled every step: padding answer rows land in a trash row.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from services.engine.model import LlamaModel
from services.engine.offload_graphs import GraphSet
from services.engine.partial_attention import merge_full


@dataclass(frozen=True)
class PoolRows:
    """A holder read in place (its pool mapped here), for a decode step: the batch rows whose
    new k, v go there and their slots in its pool, and per batch row its block table there and
    how many of those keys it sees (0: none)."""

    write_rows: np.ndarray
    write_slots: np.ndarray
    table: np.ndarray  # [n, W]
    lens: np.ndarray  # [n]


@dataclass(frozen=True)
class HolderRows:
    """One holder's share of a decode step: the batch rows of its queries, in its slice order,
    and the rows of the k, v it stores (a subset, in the same order)."""

    holder_id: str
    q_rows: np.ndarray
    kv_rows: np.ndarray


class DistGraphSet(GraphSet):
    has_after = True  # the local partial

    def __init__(
        self, model: LlamaModel, kv_cache, resolve, holders: list[tuple[list, list]],
        rows: int, max_blocks: int, pool, pools: list | None = None,
    ) -> None:  # fmt: skip
        """holders: per holder, its shared (q, k, v) send regions and (out, lse) answer
        regions; pools: the KV caches of holders read in place (same device); resolve(ids):
        input ids with pending tokens filled in; max_blocks: the widest block table."""
        super().__init__(model, rows)
        cfg = model.cfg
        dev = model.w.embed.device
        self.kv = kv_cache
        self.resolve = resolve
        self.bs = kv_cache.block_size
        self.scale = cfg.head_dim**-0.5
        self.raw_ids = torch.zeros(rows, dtype=torch.int32, device=dev)
        self.slots = torch.full((rows,), -1, dtype=torch.long, device=dev)
        self.table = torch.zeros((rows, max_blocks), dtype=torch.int32, device=dev)
        self.lens = torch.zeros(rows, dtype=torch.int32, device=dev)
        self.q = torch.zeros((rows, cfg.num_heads, cfg.head_dim), dtype=model.w.embed.dtype,
                             device=dev)  # fmt: skip
        self.out = torch.zeros((rows, cfg.num_heads, cfg.head_dim), dtype=torch.float32,
                               device=dev)  # fmt: skip
        self.lse = torch.full((rows, cfg.num_heads), float("-inf"), device=dev)
        self.holders = holders
        # Per holder: batch rows of its q rows and its k, v rows (padding: row 0), and where its
        # answer rows go (padding: the trash row `rows`).
        self.q_idx = [torch.zeros(rows, dtype=torch.long, device=dev) for _ in holders]
        self.kv_idx = [torch.zeros(rows, dtype=torch.long, device=dev) for _ in holders]
        self.ans_idx = [torch.full((rows,), rows, dtype=torch.long, device=dev) for _ in holders]
        # Per pool read in place: its writes (batch row, slot; padding: row 0 to the scratch
        # block, its last), its table and lengths per batch row, and its partial.
        self.pools = pools or []
        self.p_rows = [torch.zeros(rows, dtype=torch.long, device=dev) for _ in self.pools]
        self.p_scratch = [(p.num_blocks - 1) * p.block_size for p in self.pools]
        self.p_slots = [torch.full((rows,), sc, dtype=torch.long, device=dev)
                        for sc in self.p_scratch]  # fmt: skip
        self.p_table = [torch.zeros((rows, max_blocks), dtype=torch.int32, device=dev)
                        for _ in self.pools]  # fmt: skip
        self.p_lens = [torch.zeros(rows, dtype=torch.int32, device=dev) for _ in self.pools]
        # Without holders to merge with, the attention over the local blocks and the pools is
        # the whole attention, in the model's dtype.
        self.attn = torch.zeros_like(self.q) if not holders else None
        self.capture(pool)

    def fill(self, ids: torch.Tensor, pos: np.ndarray, slots: np.ndarray, table: np.ndarray,
             lens: np.ndarray, parts: list[HolderRows],
             pool_rows: list[PoolRows] = ()) -> None:  # fmt: skip
        """A step's inputs (n <= rows decode rows, holders and pools in the set's order)."""
        n, dev = len(pos), self.pos.device

        def put(dst: torch.Tensor, a: np.ndarray, pad) -> None:
            dst[: len(a)].copy_(torch.from_numpy(a).to(dev, non_blocking=True))
            dst[len(a) :].fill_(pad)

        self.raw_ids[:n].copy_(ids)
        self.raw_ids[n:].zero_()
        put(self.pos, pos.astype(np.int64), 0)
        put(self.slots, slots.astype(np.int64), -1)
        put(self.lens, lens.astype(np.int32), 0)
        width = table.shape[1]
        self.table[:n, :width].copy_(torch.from_numpy(table.astype(np.int32)).to(dev))
        for i, p in enumerate(parts):
            put(self.q_idx[i], p.q_rows.astype(np.int64), 0)
            put(self.kv_idx[i], p.kv_rows.astype(np.int64), 0)
            put(self.ans_idx[i], p.q_rows.astype(np.int64), self.rows)
        for i, p in enumerate(pool_rows):
            put(self.p_rows[i], p.write_rows.astype(np.int64), 0)
            put(self.p_slots[i], p.write_slots.astype(np.int64), self.p_scratch[i])
            put(self.p_lens[i], p.lens.astype(np.int32), 0)
            self.p_table[i][:n, : p.table.shape[1]].copy_(
                torch.from_numpy(p.table.astype(np.int32)).to(dev)
            )

    # -- GraphSet -------------------------------------------------------------------------------

    def input_ids(self) -> torch.Tensor:
        return self.resolve(self.raw_ids)

    def cache(self, i: int):
        k_cache, v_cache = self.kv.layer(i)
        return k_cache, v_cache, self.slots

    def send(self, i: int, q, k, v) -> None:
        self.q.copy_(q)
        n = self.rows
        for ((sq, sk, sv), _), qi, ki in zip(self.holders, self.q_idx, self.kv_idx, strict=True):
            torch.index_select(q, 0, qi, out=sq[:n])
            torch.index_select(k, 0, ki, out=sk[:n])
            torch.index_select(v, 0, ki, out=sv[:n])
        for pool, rows, slots in zip(self.pools, self.p_rows, self.p_slots, strict=True):
            k_cache, v_cache = pool.layer(i)
            k_cache.index_copy_(0, slots, k.index_select(0, rows))
            v_cache.index_copy_(0, slots, v.index_select(0, rows))

    def after(self, i: int) -> None:
        """The attention over the local blocks and the pools read in place, in one merge."""
        from services.engine.attention_cuda import paged_decode_attention_pools

        k_cache, v_cache = self.kv.layer(i)
        pools = [(k_cache, v_cache, self.table, self.lens)]
        for j, pool in enumerate(self.pools):
            pk, pv = pool.layer(i)
            pools.append((pk, pv, self.p_table[j], self.p_lens[j]))
        # No holders: the whole attention lands in attn; else a partial and its lse to merge.
        whole = self.attn is not None
        out, lse = (self.attn, None) if whole else (self.out, self.lse)
        paged_decode_attention_pools(self.q, pools, self.bs, self.scale, out=out, lse=lse)

    def attention(self, i: int) -> torch.Tensor:
        n = self.rows
        if self.attn is not None:
            return self.attn.reshape(n, self.m.q_size)
        out, lse = self.out, self.lse
        for (_, (o_ans, lse_ans)), ai in zip(self.holders, self.ans_idx, strict=True):
            part = torch.zeros((n + 1, *out.shape[1:]), dtype=torch.float32, device=out.device)
            part_lse = torch.full((n + 1, lse.shape[1]), float("-inf"), device=out.device)
            part.index_copy_(0, ai, o_ans[:n])
            part_lse.index_copy_(0, ai, lse_ans[:n])
            out, lse = merge_full(out, lse, part[:n], part_lse[:n])
        return out.to(self.q.dtype).reshape(n, self.m.q_size)


class DistGraphs:
    """Graph sets by (holders and their buffers, padded batch size), captured on first use."""

    def __init__(self, model: LlamaModel, kv_cache, resolve, sizes: list[int],
                 max_blocks: int) -> None:  # fmt: skip
        self.m = model
        self.kv = kv_cache
        self.resolve = resolve
        self.sizes = sizes
        self.max_blocks = max_blocks
        self._sets: dict[tuple, DistGraphSet] = {}
        self._pool = None

    def get(self, remote, holders: list[str], n: int, in_place: dict | None = None
            ) -> DistGraphSet | None:  # fmt: skip
        """The set for n decode rows over these holders (each must offer shared buffers and a
        local link: remote.buffers) and the holders read in place (holder -> its KVCache), or
        None."""
        size = next((s for s in self.sizes if s >= n), None)
        if size is None:
            return None
        bufs = [remote.buffers(h) for h in holders]
        if any(b is None or len(b[0][0]) < size for b in bufs):
            return None
        in_place = in_place or {}
        key = (tuple(holders), tuple(b[2] for b in bufs), size, tuple(in_place),
               tuple(id(p) for p in in_place.values()))  # fmt: skip
        gs = self._sets.get(key)
        if gs is None:
            # The same holders with new buffers or pools (one came back): the old graphs read
            # stale ones.
            stale = [k for k in self._sets if (k[0], k[3]) == (key[0], key[3])
                     and (k[1], k[4]) != (key[1], key[4])]  # fmt: skip
            for k in stale:
                del self._sets[k]
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            gs = self._sets[key] = DistGraphSet(
                self.m, self.kv, self.resolve, [(b[0], b[1]) for b in bufs], size,
                self.max_blocks, self._pool, list(in_place.values()),
            )  # fmt: skip
        return gs


def pool_inputs(seqs, holder_id: str, bs: int, max_blocks: int) -> PoolRows | None:
    """A decode step's inputs for one holder read in place, from each sequence's placement
    (its segments there with their pool blocks); None where the step can't be read in place
    (pool blocks not told, or a sequence's blocks there not one logical run)."""
    n = len(seqs)
    table = np.zeros((n, max_blocks), dtype=np.int64)
    lens = np.zeros(n, dtype=np.int64)
    rows, slots = [], []
    for r, s in enumerate(seqs):
        segs = sorted((g for g in s.remote if g.holder_id == holder_id),
                      key=lambda g: g.first_block)  # fmt: skip
        if not segs:
            continue
        if any(len(g.phys) != g.num_blocks for g in segs) or any(
            a.end_block != b.first_block for a, b in itertools.pairwise(segs)
        ):
            return None
        first = segs[0].first_block
        phys = [b for g in segs for b in g.phys]
        p = s.start
        seen = min(len(phys), p // bs - first + 1) if p >= first * bs else 0
        if seen > max_blocks:
            return None
        table[r, :seen] = phys[:seen]
        lens[r] = min(p - first * bs + 1, seen * bs) if seen else 0
        if first <= p // bs < first + len(phys):
            rows.append(r)
            slots.append(phys[p // bs - first] * bs + p % bs)
    return PoolRows(np.asarray(rows, dtype=np.int64), np.asarray(slots, dtype=np.int64),
                    table, lens)  # fmt: skip
