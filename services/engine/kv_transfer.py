"""The unit of KV that leaves or enters an engine: one block, identified by content.

A block's KV is one contiguous tensor [L, 2, T, Hkv, D] (layer-major, K then V), so its bytes
are each layer's K and V back to back and travel with just (dtype, shape); T < block_size only
for a request's last, partial block.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from services.engine.block_hash import BlockHash, hash_block, root_hash

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_NAME_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES[dtype]


@dataclass(frozen=True)
class KVLayout:
    """What a block must look like to enter an engine's cache: a tensor
    [num_layers, 2, T, num_kv_heads, head_dim] of dtype, T <= block_size, placed on device."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # "float32" | "bfloat16" | "float16"
    block_size: int
    device: str

    def fits(self, dtype: str, shape: Sequence[int]) -> bool:
        """A block of this dtype and shape can be loaded as it is (no cast, no reshape)."""
        return (
            dtype == self.dtype
            and len(shape) == 5
            and shape[0] == self.num_layers
            and shape[1] == 2
            and shape[2] <= self.block_size
            and tuple(shape[3:]) == (self.num_kv_heads, self.head_dim)
        )


@dataclass(frozen=True)
class KVBlock:
    block_hash: BlockHash
    token_ids: tuple[int, ...]
    kv: torch.Tensor  # [L, 2, T, Hkv, D], contiguous, T == len(token_ids)

    def __post_init__(self) -> None:
        if self.kv.dim() != 5 or self.kv.shape[1] != 2 or self.kv.shape[2] != len(self.token_ids):
            raise ValueError(
                f"KV block tensor must be [L, 2, T={len(self.token_ids)}, Hkv, D], "
                f"got {tuple(self.kv.shape)}"
            )

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.kv.dtype)

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def to_bytes(self) -> memoryview:
        """The raw payload without a copy when the tensor is on the CPU."""
        t = self.kv.detach().cpu().contiguous()
        return memoryview(t.view(torch.uint8).numpy()).cast("B")

    @classmethod
    def from_bytes(
        cls,
        block_hash: BlockHash,
        token_ids: tuple[int, ...],
        payload: bytes | bytearray | memoryview,
        dtype: str,
        shape: tuple[int, ...],
    ) -> KVBlock:
        if dtype not in _NAME_DTYPES:
            raise ValueError(f"unknown KV dtype {dtype!r}; expected one of {list(_NAME_DTYPES)}")
        torch_dtype = _NAME_DTYPES[dtype]
        expected = int(np.prod(shape)) * torch.empty((), dtype=torch_dtype).element_size()
        if len(payload) != expected:
            raise ValueError(
                f"KV payload has {len(payload)} bytes; {dtype} {shape} needs {expected}"
            )
        raw = torch.frombuffer(
            bytearray(payload) if isinstance(payload, bytes) else payload, dtype=torch.uint8
        )
        return cls(block_hash, token_ids, raw.view(torch_dtype).view(shape))


def export_blocks(req, kv_cache, block_size: int, model_id: str) -> list[KVBlock]:
    """A request's computed KV in an engine's cache as content-named blocks (its local blocks;
    the last may be partial)."""
    n = req.num_computed_tokens
    bs = block_size
    tokens = req.all_token_ids
    out = []
    parent = root_hash(req.cache_salt)
    for j in range(min(-(-n // bs), len(req.block_ids))):
        end = min((j + 1) * bs, n)
        ids = tuple(tokens[j * bs : end])
        h = req.block_hashes[j] if end - j * bs == bs else hash_block(parent, ids, model_id)
        out.append(KVBlock(h, ids, kv_cache.read_block(req.block_ids[j], len(ids))))
        parent = h
    return out
