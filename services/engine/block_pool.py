"""The KV block pool: reference counts, the prefix cache, and LRU eviction.

Every block is in exactly one state:
  free    ref_cnt == 0, no content hash       (in the free queue)
  cached  ref_cnt == 0, content hash known    (in the free queue AND in the hash map)
  in use  ref_cnt  > 0                        (maybe also in the hash map: shared prefix)
Allocation pops the front of the free queue (least recently released); popping a cached block
evicts its hash. Releasing appends to the back, so the free queue is the LRU order of eviction.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from services.engine.block_hash import BlockHash
from services.engine.swap_space import find_run


@dataclass
class Block:
    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None


@dataclass(frozen=True)
class PoolUsage:
    free: int
    cached: int
    in_use: int

    @property
    def total(self) -> int:
        return self.free + self.cached + self.in_use


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.enable_caching = enable_caching
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._free_mask = np.ones(num_blocks, dtype=bool)  # for finding contiguous groups
        self._cached: dict[BlockHash, int] = {}
        # Attention offload: blocks cached since take_cached_log() last ran (None: not logged).
        self._cached_log: list[tuple[int, BlockHash]] | None = None

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        """Blocks that can be allocated now: truly free plus evictable cached ones."""
        return len(self._free)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Take n blocks (ref_cnt 1 each), evicting the least recently released cached ones."""
        if n > len(self._free):
            raise RuntimeError(f"allocate({n}) with only {len(self._free)} free blocks")
        out = []
        for _ in range(n):
            bid, _ = self._free.popitem(last=False)
            self._take(bid)
            out.append(bid)
        return out

    def _take(self, bid: int) -> None:
        """A block just out of the free queue is in use (its cached hash evicted)."""
        blk = self.blocks[bid]
        if blk.block_hash is not None:
            del self._cached[blk.block_hash]
            blk.block_hash = None
        blk.ref_cnt = 1
        self._free_mask[bid] = False

    def allocate_group(self, n: int, after: int | None = None) -> list[int]:
        """Take n blocks as contiguous ids (FastSwitch's block groups): extending the group
        that ends at `after` while the next ids are free, else from the best-fitting free run,
        split across runs only when none is long enough. Contiguity comes before the LRU order
        of cached blocks."""
        if n > len(self._free):
            raise RuntimeError(f"allocate_group({n}) with only {len(self._free)} free blocks")
        out: list[int] = []
        nxt = None if after is None else after + 1
        while len(out) < n and nxt is not None and nxt < len(self.blocks) and nxt in self._free:
            del self._free[nxt]
            self._take(nxt)
            out.append(nxt)
            nxt += 1
        while len(out) < n:
            need = n - len(out)
            start = find_run(self._free_mask, need)
            if start is None:
                start = find_run(self._free_mask, 1)
                assert start is not None
            bid = start
            while len(out) < n and bid < len(self.blocks) and self._free_mask[bid]:
                del self._free[bid]
                self._take(bid)
                out.append(bid)
                bid += 1
        return out

    def release(self, block_ids: Sequence[int]) -> None:
        """Drop one reference from each block. Pass a request's blocks tail first, so that its
        prefix, the part most likely to be shared again, is evicted last."""
        for bid in block_ids:
            blk = self.blocks[bid]
            if blk.ref_cnt <= 0:
                raise RuntimeError(f"release of block {bid} with ref_cnt {blk.ref_cnt}")
            blk.ref_cnt -= 1
            if blk.ref_cnt == 0:
                self._free[bid] = None
                self._free_mask[bid] = True

    def lookup(self, hashes: Sequence[BlockHash]) -> list[int]:
        """The longest cached prefix of `hashes`, as block ids. Does not take references."""
        out = []
        if not self.enable_caching:
            return out
        for h in hashes:
            bid = self._cached.get(h)
            if bid is None:
                break
            out.append(bid)
        return out

    def acquire(self, block_ids: Sequence[int]) -> None:
        """Take a reference on blocks found by lookup (pairs with release)."""
        for bid in block_ids:
            blk = self.blocks[bid]
            if blk.ref_cnt == 0:
                del self._free[bid]
                self._free_mask[bid] = False
            blk.ref_cnt += 1

    def cache(self, block_id: int, block_hash: BlockHash) -> None:
        """Record that an in-use block now holds full, computed content with this hash.

        If another block already holds the same content, this one stays uncached (a duplicate
        computed concurrently); it is freed normally.
        """
        if not self.enable_caching:
            return
        blk = self.blocks[block_id]
        if blk.block_hash is not None or block_hash in self._cached:
            return
        blk.block_hash = block_hash
        self._cached[block_hash] = block_id
        if self._cached_log is not None:
            self._cached_log.append((block_id, block_hash))

    def log_cached(self) -> None:
        """From now on, remember every block cached until take_cached_log()."""
        self._cached_log = []

    def take_cached_log(self) -> list[tuple[int, BlockHash]]:
        if not self._cached_log:
            return []
        out, self._cached_log = self._cached_log, []
        return out

    def adopt_cached(self, blocks: Sequence[tuple[int, BlockHash]]) -> int:
        """Blocks whose content is known to be in place (a replacement model worker finding
        its predecessor's KV on the attention workers): free blocks become cached ones, found
        by lookup. Returns how many were adopted."""
        n = 0
        for bid, h in blocks:
            if not 0 <= bid < len(self.blocks) or h in self._cached or not self.enable_caching:
                continue
            blk = self.blocks[bid]
            if blk.ref_cnt == 0 and blk.block_hash is None:
                blk.block_hash = h
                self._cached[h] = bid
                n += 1
        return n

    def forget_cached(self) -> None:
        """Drop every content hash: the blocks' KV was lost (offload: a worker died). Blocks in
        use stay in use; none is found by lookup any more."""
        for blk in self.blocks:
            blk.block_hash = None
        self._cached.clear()
        if self._cached_log:
            self._cached_log.clear()

    def is_cached(self, block_hash: BlockHash) -> bool:
        return block_hash in self._cached

    def usage(self) -> PoolUsage:
        free = cached = in_use = 0
        for b in self.blocks:
            if b.ref_cnt > 0:
                in_use += 1
            elif b.block_hash is None:
                free += 1
            else:
                cached += 1
        return PoolUsage(free=free, cached=cached, in_use=in_use)

    def check_integrity(self) -> PoolUsage:
        """Raise if any invariant is broken; return the usage counts."""
        for b in self.blocks:
            if b.ref_cnt < 0:
                raise AssertionError(f"block {b.block_id} has ref_cnt {b.ref_cnt}")
            if (b.ref_cnt == 0) != (b.block_id in self._free):
                raise AssertionError(f"block {b.block_id}: ref_cnt {b.ref_cnt} vs free queue")
            if bool(self._free_mask[b.block_id]) != (b.ref_cnt == 0):
                raise AssertionError(f"block {b.block_id}: ref_cnt {b.ref_cnt} vs free mask")
            if b.block_hash is not None and self._cached.get(b.block_hash) != b.block_id:
                raise AssertionError(f"block {b.block_id}: hash not mapped back to it")
        if len(self._cached) != sum(b.block_hash is not None for b in self.blocks):
            raise AssertionError("hash map holds entries for blocks without that hash")
        usage = self.usage()
        if usage.total != self.num_blocks or usage.free + usage.cached != len(self._free):
            raise AssertionError(f"usage {usage} does not add up to {self.num_blocks}")
        return usage
