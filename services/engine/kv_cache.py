"""The paged KV cache tensor: fixed-size blocks of token slots for every layer."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from services.engine.config import ModelConfig


@dataclass
class KVCache:
    """data: [L, 2, num_blocks, block_size, Hkv, D]; index 0 of dim 1 is K, 1 is V.

    One tensor, so a block's whole KV across layers is `data[:, :, b]` and a transfer is one copy.
    """

    data: torch.Tensor

    @classmethod
    def allocate(
        cls, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: str
    ) -> KVCache:
        shape = (cfg.num_layers, 2, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device))

    @staticmethod
    def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * itemsize

    @property
    def num_blocks(self) -> int:
        return self.data.shape[2]

    @property
    def block_size(self) -> int:
        return self.data.shape[3]

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of layer i, each [num_blocks * block_size, Hkv, D] (slot-addressed views)."""
        k = self.data[i, 0].flatten(0, 1)
        v = self.data[i, 1].flatten(0, 1)
        return k, v

    def read_block(self, block_id: int, num_tokens: int) -> torch.Tensor:
        """A contiguous copy of one block's first num_tokens slots: [L, 2, T, Hkv, D]."""
        return self.data[:, :, block_id, :num_tokens].contiguous()

    def write_block(self, block_id: int, kv: torch.Tensor) -> None:
        # kv: [L, 2, T, Hkv, D], T <= block_size
        self.data[:, :, block_id, : kv.shape[2]].copy_(kv)


def slot_mapping(block_ids: list[int], start: int, end: int, block_size: int) -> np.ndarray:
    """Cache slots of a request's positions [start, end): slot = block id * block_size + offset."""
    pos = np.arange(start, end)
    return np.asarray(block_ids, dtype=np.int64)[pos // block_size] * block_size + pos % block_size
