"""The KV tier behind the host swap space: a store that already holds some of a request's
blocks, such as the KV store a decode replica pulled the prompt's KV from.

A preempted request's leading blocks that the tier holds are neither copied to the host (swap
modes) nor computed again (any mode): when the request is admitted again, the blocks the
device's prefix cache no longer has are fetched back from the tier, and only what the tier
has lost meanwhile is recomputed. The engine does no networking: its owner hands it a KVTier
whose fetch runs elsewhere (the service's event loop) and answers through a future, which the
scheduler polls each step while the request waits outside the queue.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future
from typing import Protocol

from services.engine.block_hash import BlockHash
from services.engine.kv_transfer import KVBlock
from services.engine.request import Request

log = logging.getLogger(__name__)


class KVTier(Protocol):
    def fetch(self, hashes: list[BlockHash]) -> Future[list[KVBlock | None]]:
        """The blocks named, in order; None for one the tier no longer has (or can't read)."""
        ...


def fetched_blocks(req: Request, start: int, fut: Future) -> list[KVBlock | None]:
    """What a finished fetch brought: the request's KV by block position from `start`, up to
    the first block missing. A failed fetch brings nothing (those blocks are recomputed)."""
    try:
        blocks = list(fut.result())
    except Exception as e:  # the tier's failure costs compute, never the request
        log.warning("KV tier fetch for %s failed (%s): recomputing", req.request_id, e)
        blocks = []
    ok = 0
    for pos, blk in enumerate(blocks, start):
        if blk is None or blk.num_tokens != req.block_size or not req.holds(pos, blk):
            break
        ok += 1
    return blocks[:ok]
