"""A creditor's pool: KV blocks lent to other engines' sequences, and attention over them.

The attention service (services/attention.py) wraps one KVHolder per process. Blocks are lent
per (borrower, sequence) at logical block positions; each step the borrower sends the queries
and new K/V of its sequences, layer by layer, and gets back the partial attention over the
blocks held here with its log-sum-exp. No networking and no model weights: only the KV layout.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np
import torch

from services.engine.block_pool import BlockPool
from services.engine.config import ModelConfig
from services.engine.kv_cache import KVCache
from services.engine.partial_attention import SegmentBatch, partial_attention
from services.engine.remote_kv import SeqSlice


class UnknownSequenceError(LookupError):
    """No blocks are held here for this sequence (never lent, released, or lost in a restart)."""


class SegmentError(ValueError):
    """A request that does not fit what is held: wrong shapes, dtypes, layers or positions."""


class LendRefused(RuntimeError):
    """The holder will not lend these blocks (cap reached, or no free memory)."""


@dataclass
class HeldSeq:
    blocks: dict[int, int] = field(default_factory=dict)  # logical block -> physical block
    # The same, ordered by logical block (kept as blocks are lent, so a step need not sort).
    order: list[int] = field(default_factory=list)
    phys: list[int] = field(default_factory=list)


@dataclass
class _Step:
    slices: list[SeqSlice]
    seg: SegmentBatch
    write_slots: torch.Tensor  # [sum num_write] cache slots of the step's new K/V
    num_q: int
    num_write: int


class KVHolder:
    def __init__(
        self,
        cfg: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: str = "cpu",
        lend_cap: int | None = None,
        *,
        pool: BlockPool | None = None,
        kv_cache: KVCache | None = None,
        reserve: int = 0,
    ) -> None:
        """A pool of its own (num_blocks), or an engine's `pool` and `kv_cache` shared: then it
        lends their free blocks, keeping `reserve` of them free for the engine's own work, and
        every lend and release must run on the engine's thread (the caller's business)."""
        self.cfg = cfg
        self.block_size = block_size
        self.dtype = dtype
        self.device = device
        # Its own cache on a GPU has one block more than it lends: the scratch block that a
        # CUDA graph's padding rows write to (graphs only run over a cache of its own).
        self._graphable = kv_cache is None and torch.device(device).type == "cuda"
        self.kv_cache = kv_cache or KVCache.allocate(
            cfg, num_blocks + self._graphable, block_size, dtype, device
        )
        self.pool = pool or BlockPool(num_blocks, enable_caching=False)
        self.reserve = reserve
        self.lend_cap = self.pool.num_blocks if lend_cap is None else lend_cap
        self.scale = cfg.head_dim**-0.5
        self._lent = 0
        self._seqs: dict[tuple[str, str], HeldSeq] = {}
        self._steps: dict[str, _Step] = {}  # borrower -> its current step
        self._graphs: dict[str, object] = {}  # borrower -> ShardGraphs over its shared buffers

    # -- lending ------------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """Blocks of the pool it lends from."""
        return self.pool.num_blocks

    @property
    def lent(self) -> int:
        return self._lent

    def held_block_ids(self) -> list[int]:
        """Every block lent now (an engine sharing its pool counts them as held)."""
        return [b for s in list(self._seqs.values()) for b in s.phys]

    def lent_to(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for (owner, _), s in list(self._seqs.items()):  # one C-level copy: safe to scrape
            out[owner] = out.get(owner, 0) + len(s.blocks)
        return out

    def can_lend(self, n: int) -> str | None:
        """Why n more blocks can't be lent now, or None if they can."""
        if self.lent + n > self.lend_cap:
            return f"lend cap reached ({self.lent} of {self.lend_cap} blocks lent)"
        if not self.pool.can_allocate(n + self.reserve):
            return f"only {self.pool.num_free} free blocks, {self.reserve} of them kept"
        return None

    def lend(self, owner: str, seq_id: str, first_block: int, num_blocks: int) -> None:
        if num_blocks <= 0 or first_block < 0:
            raise SegmentError(f"bad block range: first {first_block}, count {num_blocks}")
        why = self.can_lend(num_blocks)
        if why is not None:
            raise LendRefused(why)
        held = self._seqs.setdefault((owner, seq_id), HeldSeq())
        wanted = range(first_block, first_block + num_blocks)
        if any(b in held.blocks for b in wanted):
            raise SegmentError(f"sequence {seq_id!r} already holds some of blocks {wanted}")
        for logical, phys in zip(wanted, self.pool.allocate(num_blocks), strict=True):
            held.blocks[logical] = phys
        self._lent += num_blocks
        if held.order and held.order[-1] > first_block:  # lent out of order: re-sort once
            pairs = sorted(held.blocks.items())
            held.order, held.phys = [b for b, _ in pairs], [p for _, p in pairs]
        else:
            held.order += wanted
            held.phys += [held.blocks[b] for b in wanted]

    def physical(self, owner: str, seq_id: str, first_block: int, num_blocks: int) -> list[int]:
        """The pool blocks lent for logical blocks [first_block, +num_blocks) of a sequence."""
        held = self._seqs[(owner, seq_id)]
        return [held.blocks[b] for b in range(first_block, first_block + num_blocks)]

    @property
    def shareable(self) -> bool:
        """Its pool is its own, on a GPU, with a scratch block: a decoder on the same device
        may map it and use its lent blocks in place."""
        return self._graphable

    def release(self, owner: str, seq_id: str) -> int:
        held = self._seqs.pop((owner, seq_id), None)
        if held is None:
            return 0
        self.pool.release(held.phys)
        self._lent -= len(held.blocks)
        return len(held.blocks)

    def release_owner(self, owner: str) -> int:
        """Everything lent to one borrower (its stream ended: it left or died)."""
        self._steps.pop(owner, None)
        self._graphs.pop(owner, None)
        return sum(self.release(o, s) for o, s in list(self._seqs) if o == owner)

    def seqs_of(self, owner: str) -> list[str]:
        return [s for o, s in self._seqs if o == owner]

    def held_blocks(self, owner: str, seq_id: str) -> int:
        held = self._seqs.get((owner, seq_id))
        return len(held.blocks) if held else 0

    # -- attention ----------------------------------------------------------------------------

    def begin_step(self, owner: str, slices: list[SeqSlice]) -> None:
        """Check a step's slices against what is held and prepare its segment tables."""
        self._steps.pop(owner, None)  # a step that fails leaves none: its layers fail too
        bs = self.block_size
        segments, slots = [], []
        for s in slices:
            held = self._seqs.get((owner, s.seq_id))
            if held is None:
                raise UnknownSequenceError(f"no blocks are held for sequence {s.seq_id!r}")
            if s.num_q <= 0 or s.q_start < 0 or s.num_write < 0:
                raise SegmentError(f"sequence {s.seq_id!r}: bad slice {s}")
            for p in range(s.write_start, s.write_start + s.num_write):
                phys = held.blocks.get(p // bs)
                if phys is None:
                    raise SegmentError(
                        f"sequence {s.seq_id!r}: position {p} is in block {p // bs}, not held here"
                    )
                slots.append(phys * bs + p % bs)
            last = s.q_start + s.num_q - 1
            n = bisect.bisect_right(held.order, last // bs)  # blocks with a key <= last
            segments.append((s.q_start, s.num_q, held.phys[:n], held.order[:n]))
        seg = SegmentBatch.build(segments, self.device)
        write_slots = torch.tensor(slots, dtype=torch.long, device=self.device)
        num_q = sum(s.num_q for s in slices)
        self._steps[owner] = _Step(list(slices), seg, write_slots, num_q, len(slots))
        graphs = self._graphs.get(owner)
        if graphs is not None:
            graphs.begin(0, *_decode_inputs(segments, slots, bs))

    # -- CUDA graphs (a decoder on this GPU, through shared buffers) -------------------------

    def enable_graphs(self, owner: str, src, dst, rows: int) -> None:
        """Run the owner's decode steps as one CUDA graph replay per layer, reading q, k, v from
        src and writing out and lse to dst (its shared buffers, fixed for the session)."""
        from services.engine.fused_ops import HAS_TRITON

        if not self._graphable or not HAS_TRITON:
            return
        from services.engine.shard_graphs import ShardGraphs

        self._graphs[owner] = ShardGraphs(
            self.kv_cache, self.cfg.num_layers, self.block_size, self.scale,
            self.pool.num_blocks, rows, [src], [dst],
        )  # fmt: skip

    def disable_graphs(self, owner: str) -> None:
        self._graphs.pop(owner, None)

    def replay(self, owner: str, layer: int, num_q: int, num_write: int) -> bool:
        """The layer of the owner's step as its graph, over the shared buffers, if the step
        has one (its rows checked as attend() would); False: run attend() instead."""
        step, graphs = self._steps.get(owner), self._graphs.get(owner)
        if step is None or graphs is None:
            return False
        if not 0 <= layer < self.cfg.num_layers:
            raise SegmentError(f"layer {layer} is outside [0, {self.cfg.num_layers})")
        if (num_q, num_write) != (step.num_q, step.num_write):
            raise SegmentError(
                f"a batch of {num_q} q and {num_write} k/v rows; the step has {step.num_q} "
                f"and {step.num_write}"
            )
        return graphs.replay(0, layer)

    def attend(
        self, owner: str, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer batch of the owner's current step: write k/v, attend q. Returns out
        [n, H, D] and lse [n, H] in float32."""
        step = self._steps.get(owner)
        if step is None:
            raise SegmentError("a layer batch came before its step's slices")
        cfg = self.cfg
        if not 0 <= layer < cfg.num_layers:
            raise SegmentError(f"layer {layer} is outside [0, {cfg.num_layers})")
        want_q = (step.num_q, cfg.num_heads, cfg.head_dim)
        want_kv = (step.num_write, cfg.num_kv_heads, cfg.head_dim)
        if tuple(q.shape) != want_q:
            raise SegmentError(f"q has shape {tuple(q.shape)}, the step needs {want_q}")
        for name, t in (("k", k), ("v", v)):
            if tuple(t.shape) != want_kv:
                raise SegmentError(f"{name} has shape {tuple(t.shape)}, the step needs {want_kv}")
            if t.dtype != self.dtype:
                raise SegmentError(f"{name} is {t.dtype}, this pool holds {self.dtype}")
        if q.dtype != self.dtype:
            raise SegmentError(f"q is {q.dtype}, this pool holds {self.dtype}")
        k_cache, v_cache = self.kv_cache.layer(layer)
        if step.num_write:
            k_cache.index_copy_(0, step.write_slots, k.to(self.device))
            v_cache.index_copy_(0, step.write_slots, v.to(self.device))
        return partial_attention(
            q.to(self.device), k_cache, v_cache, step.seg, self.block_size, self.scale
        )


def _decode_inputs(segments, slots: list[int], bs: int):
    """A step's graph inputs (write slots, block table, context lengths, eligible): decode
    rows only, each sequence's blocks here one run of consecutive logical blocks (the decode
    kernel counts keys from the run's first)."""
    eligible = all(
        nq == 1 and (not order or order[-1] - order[0] == len(order) - 1)
        for _, nq, _, order in segments
    )
    width = max([1, *(len(phys) for _, _, phys, _ in segments)])
    table = np.zeros((len(segments), width), dtype=np.int64)
    lens = np.zeros(len(segments), dtype=np.int64)
    if eligible:
        for r, (q0, _, phys, order) in enumerate(segments):
            table[r, : len(phys)] = phys
            if order:
                lens[r] = min(q0 - order[0] * bs + 1, len(order) * bs)
    return np.asarray(slots, dtype=np.int64), table, np.maximum(lens, 0), eligible
