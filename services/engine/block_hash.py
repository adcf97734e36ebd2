"""Content identity of a KV block: the same prefix means the same block id everywhere.

block_id = H(parent_block_id, token_ids of the block, model_id). The KV store, the router's
prefix-aware placement and the engine's prefix cache all use this one definition.

A cache salt gives a sequence a root of its own (the first block's parent), so every block of
it differs from the same tokens under another salt: the router salts each tenant's requests
(its cache scope), and a prompt of one tenant never hits blocks another tenant computed, in
any engine or in the store. The empty salt keeps the unsalted root.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

BlockHash = bytes  # 16 bytes
ROOT_HASH: BlockHash = b"\x00" * 16


def root_hash(cache_salt: str = "") -> BlockHash:
    """The parent of a sequence's first block under `cache_salt`."""
    if not cache_salt:
        return ROOT_HASH
    h = hashlib.blake2b(digest_size=16, person=b"splitserve-salt")
    h.update(cache_salt.encode("utf-8", "surrogatepass"))
    return h.digest()


def hash_block(parent: BlockHash, token_ids: Sequence[int], model_id: str) -> BlockHash:
    h = hashlib.blake2b(digest_size=16)
    h.update(parent)
    h.update(np.asarray(token_ids, dtype="<i8").tobytes())
    h.update(model_id.encode())
    return h.digest()


def hash_blocks(
    token_ids: Sequence[int],
    block_size: int,
    model_id: str,
    include_partial: bool = False,
    cache_salt: str = "",
) -> list[BlockHash]:
    """Chain the hashes of consecutive blocks of `token_ids`.

    Only full blocks are hashed unless include_partial: a partial tail block's id then covers
    just the tokens it holds (it is never entered in a prefix cache, but a transfer can name it).
    """
    out: list[BlockHash] = []
    parent = root_hash(cache_salt)
    n_full = len(token_ids) // block_size
    end = len(token_ids) if include_partial else n_full * block_size
    for start in range(0, end, block_size):
        parent = hash_block(parent, token_ids[start : start + block_size], model_id)
        out.append(parent)
    return out


def model_fingerprint(model_dir: Path) -> str:
    """Identity of a model's weights for block hashes: its name plus a digest of its config and
    weight files' names and sizes, so two different checkpoints never share block ids."""
    h = hashlib.blake2b(digest_size=8)
    h.update((model_dir / "config.json").read_bytes())
    for f in sorted(model_dir.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return f"{model_dir.name}@{h.hexdigest()}"
