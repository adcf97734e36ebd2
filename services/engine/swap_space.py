"""Preemption by swapping: the host tier's blocks and the copies the scheduler asks for.

Three preemption modes (EngineConfig.preemption_mode):

- "recompute": a preempted request drops its KV and computes it again (what full blocks the
  prefix cache still holds excepted);
- "swap": vLLM's former swap. Its KV is copied to host blocks, one copy per block per layer,
  synchronously before the step runs; swapped in the same way when it is admitted again, and
  the host blocks are freed;
- "fastswitch" (FastSwitch, Shen et al.): the device pool hands a request contiguous block
  groups (BlockPool.allocate_group), host blocks are taken contiguously too, and a swap is one
  large copy per run of blocks contiguous on both sides, asynchronous (services.engine.swapper):
  a swapped-out block returns to the pool only once its copy is done, and a request whose
  swap-in has not finished skips the step. The host copy stays valid after swap-in, so the next
  swap-out sends only the blocks written since (multi-turn reuse); blocks the device prefix
  cache still holds at swap-in are not copied back.

This module is bookkeeping only (which blocks, which runs); the copies are the Swapper's.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

MODES = ("recompute", "swap", "fastswitch")


@dataclass(frozen=True)
class SwapOp:
    """Copies between device blocks and host blocks. runs: (device block, host block, count):
    `count` blocks from each start, one copy each (per_block: one copy per block per layer)."""

    op_id: int
    to_host: bool
    runs: tuple[tuple[int, int, int], ...]
    per_block: bool

    @property
    def num_blocks(self) -> int:
        return sum(n for _, _, n in self.runs)


def runs_of(pairs: list[tuple[int, int]], group: bool) -> tuple[tuple[int, int, int], ...]:
    """(device, host) block pairs as runs: consecutive on both sides merge when grouping."""
    out: list[list[int]] = []
    for d, h in pairs:
        if group and out and out[-1][0] + out[-1][2] == d and out[-1][1] + out[-1][2] == h:
            out[-1][2] += 1
        else:
            out.append([d, h, 1])
    return tuple((d, h, n) for d, h, n in out)


def find_run(free: np.ndarray, n: int) -> int | None:
    """The start of the smallest run of >= n free slots (best fit keeps long runs whole), or
    None."""
    padded = np.concatenate(([False], free, [False]))
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    starts, ends = edges[0::2], edges[1::2]
    lens = ends - starts
    ok = np.flatnonzero(lens >= n)
    if ok.size == 0:
        return None
    return int(starts[ok[np.argmin(lens[ok])]])


class HostBlocks:
    """Free/used host blocks. contiguous: allocations extend the previous block when it can,
    else take the best-fitting free run, splitting across runs only when none is long enough."""

    def __init__(self, num_blocks: int, contiguous: bool) -> None:
        self.free = np.ones(num_blocks, dtype=bool)
        self.contiguous = contiguous

    @property
    def num_blocks(self) -> int:
        return self.free.size

    @property
    def num_free(self) -> int:
        return int(self.free.sum())

    def allocate(self, n: int, after: int | None = None) -> list[int] | None:
        if n > self.num_free:
            return None
        out: list[int] = []
        if self.contiguous:
            nxt = None if after is None else after + 1
            while len(out) < n and nxt is not None and nxt < self.free.size and self.free[nxt]:
                out.append(nxt)
                self.free[nxt] = False
                nxt += 1
            while len(out) < n:
                need = n - len(out)
                start = find_run(self.free, need)
                if start is None:  # no run long enough: the longest one, then the rest
                    start = find_run(self.free, 1)
                    assert start is not None
                    stop = start
                    while stop < self.free.size and self.free[stop] and stop - start < need:
                        stop += 1
                    take = list(range(start, stop))
                else:
                    take = list(range(start, start + need))
                self.free[take] = False
                out += take
            return out
        ids = np.flatnonzero(self.free)[:n].tolist()
        self.free[ids] = False
        return ids

    def release(self, ids: list[int]) -> None:
        if ids and self.free[ids].any():
            raise RuntimeError(f"release of free host blocks {ids}")
        self.free[ids] = True


@dataclass
class HostCopy:
    """A request's KV on the host: host block per position from `first` on (the leading
    blocks are the KV tier's), valid for tokens [0, tokens)."""

    blocks: list[int] = field(default_factory=list)
    tokens: int = 0
    first: int = 0


class SwapSpace:
    """The scheduler's side of swapping: host blocks, per-request host copies, and the copies
    to run (taken by the engine each step)."""

    def __init__(self, mode: str, num_host_blocks: int, block_size: int) -> None:
        if mode not in MODES[1:]:
            raise ValueError(f"SwapSpace is for swap or fastswitch, got {mode!r}")
        self.mode = mode
        self.group = mode == "fastswitch"
        self.host = HostBlocks(num_host_blocks, contiguous=self.group)
        self.block_size = block_size
        self.copies: dict[str, HostCopy] = {}  # by request id
        self.ops: list[SwapOp] = []  # to run, in order
        self._ids = itertools.count(1)
        self.num_swapped_out = 0
        self.num_fallbacks = 0  # swap-outs that found no host room: recomputed instead
        self.blocks_out = 0  # blocks copied to the host
        self.blocks_reused = 0  # blocks a swap-out did not send (host copy still valid)
        self.blocks_in_tier = 0  # blocks a swap-out did not send (the KV tier holds them)

    def take_ops(self) -> list[SwapOp]:
        out, self.ops = self.ops, []
        return out

    def _op(self, to_host: bool, pairs: list[tuple[int, int]]) -> SwapOp | None:
        if not pairs:
            return None
        op = SwapOp(next(self._ids), to_host, runs_of(pairs, self.group), not self.group)
        self.ops.append(op)
        return op

    def swap_out(
        self,
        rid: str,
        device_blocks: list[int],
        tokens: int,
        evictable: list[str],
        skip: int = 0,
    ) -> SwapOp | bool | None:
        """Plan copying the KV of tokens [0, tokens) (in device_blocks) to the host, but for
        the first `skip` blocks (the KV tier holds them). Returns the op (None if nothing had
        to be sent), or False when the host has no room even after dropping the kept copies of
        `evictable` requests (running ones): recompute instead."""
        bs = self.block_size
        nblk = -(-tokens // bs)
        hc = self.copies.setdefault(rid, HostCopy(first=skip))
        if hc.first != skip or (not self.group and hc.blocks):
            self.host.release(hc.blocks)
            hc.blocks, hc.tokens, hc.first = [], 0, skip
        # Host blocks (from `first`) still valid: full blocks the last swap-out sent.
        valid = max(0, min(hc.tokens, tokens) // bs - skip) if self.group else 0
        need = nblk - skip - len(hc.blocks)
        if need > self.host.num_free:
            for other in evictable:
                if need <= self.host.num_free:
                    break
                if other != rid:
                    self.drop(other)
        if need > self.host.num_free:
            self.drop(rid)
            self.num_fallbacks += 1
            log.warning(
                "swap space exhausted (%d host blocks free, %d needed): request %s will be "
                "recomputed", self.host.num_free, need, rid,
            )  # fmt: skip
            return False
        if need > 0:
            got = self.host.allocate(need, hc.blocks[-1] if hc.blocks else None)
            assert got is not None
            hc.blocks += got
        elif need < 0:  # fewer tokens than before (cannot happen for a live request)
            self.host.release(hc.blocks[nblk - skip :])
            hc.blocks = hc.blocks[: nblk - skip]
        hc.tokens = tokens
        self.num_swapped_out += 1
        self.blocks_out += nblk - skip - valid
        self.blocks_reused += valid
        self.blocks_in_tier += skip
        pairs = list(zip(device_blocks[skip + valid : nblk], hc.blocks[valid:], strict=True))
        return self._op(True, pairs)

    def host_tokens(self, rid: str) -> int:
        hc = self.copies.get(rid)
        return hc.tokens if hc is not None else 0

    def host_first(self, rid: str) -> int:
        """The first block position the request's host copy holds (those before: the tier's)."""
        hc = self.copies.get(rid)
        return hc.first if hc is not None else 0

    def swap_in(self, rid: str, first: int, device_blocks: list[int]) -> SwapOp | None:
        """Plan copying the request's blocks at positions [first, first + len(device_blocks))
        from the host into device_blocks (blocks before `first` were found in the device
        prefix cache or came from the KV tier)."""
        hc = self.copies[rid]
        lo = first - hc.first
        pairs = list(zip(device_blocks, hc.blocks[lo : lo + len(device_blocks)], strict=True))
        op = self._op(False, pairs)
        if not self.group:  # vLLM's swap frees the host copy once read (the op runs first)
            self.host.release(hc.blocks)
            del self.copies[rid]
        return op

    def drop(self, rid: str) -> None:
        """Forget a request's host copy (it finished, or its room is needed). A copy still in
        flight is ordered before any later one that reuses the blocks (one queue)."""
        hc = self.copies.pop(rid, None)
        if hc is not None and hc.blocks:
            self.host.release(hc.blocks)

    def invalidate_from(self, rid: str, tokens: int) -> None:
        """The request's KV from token `tokens` on changes (recomputed): the host copy is valid
        only before it."""
        hc = self.copies.get(rid)
        if hc is not None:
            hc.tokens = min(hc.tokens, tokens)
