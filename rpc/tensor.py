"""Tensors on the wire: a layout (dtype name, shape) beside raw bytes, never pickled.

Names are torch's dtype names without the `torch.` prefix, so either side maps them to its own
types; this module needs no torch."""

from __future__ import annotations

import math
from dataclasses import dataclass

from protos.splitserve.v1 import common_pb2 as cpb

DTYPE_SIZES = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float64": 8,
    "int8": 1,
    "uint8": 1,
    "int32": 4,
    "int64": 8,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
}


@dataclass(frozen=True)
class TensorSpec:
    dtype: str
    shape: tuple[int, ...]
    name: str = ""

    def __post_init__(self) -> None:
        # Always a tuple of ints, so a spec hashes (layouts are cached by it) and compares equal
        # however its shape was given (a list, a torch.Size, numpy ints).
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))

    @property
    def nbytes(self) -> int:
        """Bytes of a tensor with this layout (KeyError for an unknown dtype: check `known`)."""
        return DTYPE_SIZES[self.dtype] * math.prod(self.shape)

    @property
    def known(self) -> bool:
        return self.dtype in DTYPE_SIZES

    def to_pb(self) -> cpb.TensorLayout:
        return cpb.TensorLayout(name=self.name, dtype=self.dtype, shape=self.shape)

    @classmethod
    def from_pb(cls, t: cpb.TensorLayout) -> TensorSpec:
        return cls(t.dtype, tuple(t.shape), t.name)
