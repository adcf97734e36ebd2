"""The block pool's states, exact allocation and eviction order, and its integrity check."""

import pytest

from services.engine.block_hash import ROOT_HASH, hash_block, hash_blocks
from services.engine.block_pool import BlockPool, PoolUsage


def h(i: int) -> bytes:
    return hash_block(ROOT_HASH, [i], "m")


def test_fresh_pool_allocates_in_id_order():
    pool = BlockPool(4)
    assert pool.allocate(2) == [0, 1]
    assert pool.allocate(1) == [2]
    assert pool.check_integrity() == PoolUsage(free=1, cached=0, in_use=3)


def test_release_order_is_eviction_order():
    pool = BlockPool(4)
    a = pool.allocate(2)  # [0, 1]
    b = pool.allocate(2)  # [2, 3]
    for bid, i in zip(a + b, range(4), strict=True):
        pool.cache(bid, h(i))
    # Release tail first, as a request does: 1, 0, then 3, 2. Free queue (LRU) is now 1,0,3,2.
    pool.release(list(reversed(a)))
    pool.release(list(reversed(b)))
    assert pool.check_integrity() == PoolUsage(free=0, cached=4, in_use=0)
    # Allocation evicts from the front: block 1 (hash h(1)) goes first, then 0.
    assert pool.allocate(1) == [1]
    assert not pool.is_cached(h(1))
    assert pool.lookup([h(0)]) == [0]
    assert pool.allocate(1) == [0]
    assert pool.lookup([h(0)]) == []
    assert pool.check_integrity() == PoolUsage(free=0, cached=2, in_use=2)


def test_lookup_is_longest_prefix_and_acquire_revives_cached_block():
    pool = BlockPool(3)
    hashes = hash_blocks(list(range(48)), 16, "m")
    ids = pool.allocate(3)
    for bid, hh in zip(ids, hashes, strict=True):
        pool.cache(bid, hh)
    pool.release(list(reversed(ids)))
    # Only the prefix counts: a miss in the middle ends the match.
    assert pool.lookup([hashes[0], h(99), hashes[2]]) == [0]
    assert pool.lookup(hashes) == [0, 1, 2]
    pool.acquire([0, 1])
    assert pool.num_free == 1  # block 2 only; 0 and 1 left the free queue
    assert pool.check_integrity() == PoolUsage(free=0, cached=1, in_use=2)
    pool.acquire([0])  # shared by a second request
    assert pool.blocks[0].ref_cnt == 2
    pool.release([0, 0, 1])
    assert pool.check_integrity() == PoolUsage(free=0, cached=3, in_use=0)


def test_duplicate_content_stays_uncached():
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    pool.cache(a, h(1))
    pool.cache(b, h(1))  # computed concurrently with the same content
    assert pool.lookup([h(1)]) == [a]
    pool.release([b, a])
    assert pool.check_integrity() == PoolUsage(free=1, cached=1, in_use=0)


def test_misuse_is_caught():
    pool = BlockPool(2)
    with pytest.raises(RuntimeError, match="allocate"):
        pool.allocate(3)
    (a,) = pool.allocate(1)
    pool.release([a])
    with pytest.raises(RuntimeError, match="ref_cnt"):
        pool.release([a])
    pool.blocks[1].ref_cnt = -1
    with pytest.raises(AssertionError, match="ref_cnt -1"):
        pool.check_integrity()


def test_caching_disabled():
    pool = BlockPool(2, enable_caching=False)
    (a,) = pool.allocate(1)
    pool.cache(a, h(0))
    assert pool.lookup([h(0)]) == []


def test_block_hash_chains_and_depends_on_model():
    toks = list(range(40))
    full = hash_blocks(toks, 16, "m")
    assert len(full) == 2
    assert len(hash_blocks(toks, 16, "m", include_partial=True)) == 3
    assert full[1] == hash_block(full[0], toks[16:32], "m")
    assert hash_blocks(toks, 16, "other") != full
    # Same block tokens under a different parent differ.
    assert hash_block(h(5), toks[:16], "m") != full[0]
