"""Conversions between the wire (splitserve.v1 protos, KV store blocks) and the engine's types."""

from __future__ import annotations

import torch

from kvstore.block import BlockMeta, StoredBlock
from protos.splitserve.v1 import common_pb2 as cpb
from rpc.sampling import sampling_fields
from rpc.tensor import TensorSpec
from services.engine.errors import InvalidRequestError
from services.engine.kv_transfer import KVBlock, KVLayout
from services.engine.sampler import SampledToken
from services.engine.sampling_params import SamplingParams


def sampling_from_pb(p: cpb.SamplingParams) -> SamplingParams:
    """Validated engine parameters; a bad value raises InvalidRequestError naming it."""
    try:
        return SamplingParams(**sampling_fields(p))
    except (ValueError, TypeError) as e:
        raise InvalidRequestError(str(e)) from None


def logprob_to_pb(t: SampledToken) -> cpb.TokenLogprob:
    return cpb.TokenLogprob(
        token_id=t.token_id,
        logprob=t.logprob if t.logprob is not None else 0.0,
        top=[cpb.TopLogprob(token_id=i, logprob=lp) for i, lp in t.top_logprobs],
    )


def _kv_spec(b: KVBlock) -> TensorSpec:
    return TensorSpec(b.dtype_name, tuple(b.kv.shape), "kv")


def kv_to_stored(b: KVBlock, model_id: str) -> StoredBlock:
    """The engine's block as store bytes: its tensor's raw bytes, no copy on CPU."""
    return StoredBlock.build(b.block_hash, model_id, b.to_bytes(), [_kv_spec(b)], b.token_ids)


def device_meta(b: KVBlock, model_id: str) -> BlockMeta:
    """The engine's block's metadata for a device pool (no CRC: its bytes stay on the GPU)."""
    spec = _kv_spec(b)
    return BlockMeta(b.block_hash, model_id, (spec,), spec.nbytes, 0, b.token_ids)


def stored_to_kv(s: StoredBlock, model_id: str, layout: KVLayout) -> KVBlock | None:
    """Back to an engine block, or None if it doesn't fit the engine's KV layout (another model,
    layout or dtype): the caller recomputes rather than loading foreign KV."""
    t = s.meta.tensors
    if s.meta.model_id != model_id or len(t) != 1 or t[0].name != "kv":
        return None
    shape = t[0].shape
    if not layout.fits(t[0].dtype, shape):
        return None
    if isinstance(s.payload, torch.Tensor):  # a GPU-to-GPU pull: already on this device
        try:
            kv = s.payload.view(getattr(torch, t[0].dtype)).view(shape)
            return KVBlock(s.block_id, s.meta.token_ids, kv)
        except (RuntimeError, ValueError):
            return None
    try:
        return KVBlock.from_bytes(s.block_id, s.meta.token_ids, s.payload, t[0].dtype, shape)
    except ValueError:
        return None


def tensor_spec(dtype: torch.dtype, shape) -> TensorSpec:
    """How a tensor of this dtype and shape is described on the wire."""
    return TensorSpec(str(dtype).removeprefix("torch."), tuple(shape))


def tensor_to_pb(t: torch.Tensor, msg) -> None:
    """Fill a splitserve.v1.Tensor message with t's layout and raw bytes (copied to the host)."""
    t = t.detach().contiguous()
    spec = tensor_spec(t.dtype, t.shape)
    msg.layout.CopyFrom(spec.to_pb())
    msg.data = t.cpu().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def tensor_from_pb(msg, name: str) -> torch.Tensor:
    """A tensor from a splitserve.v1.Tensor message; a layout its bytes don't match raises
    InvalidRequestError naming the tensor. The result shares the message's bytes (read-only
    in spirit: copy it before writing)."""
    spec = TensorSpec.from_pb(msg.layout)
    if not spec.known or spec.dtype not in _TORCH_DTYPES:
        raise InvalidRequestError(f"{name}: unsupported dtype {spec.dtype!r}")
    if any(d < 0 for d in spec.shape):
        raise InvalidRequestError(f"{name}: negative dimension in shape {spec.shape}")
    if len(msg.data) != spec.nbytes:
        raise InvalidRequestError(
            f"{name}: {len(msg.data)} bytes for a {spec.dtype} tensor of shape {spec.shape} "
            f"({spec.nbytes} bytes)"
        )
    dtype = _TORCH_DTYPES[spec.dtype]
    if spec.nbytes == 0:
        return torch.empty(spec.shape, dtype=dtype)
    return torch.frombuffer(bytearray(msg.data), dtype=dtype).view(spec.shape)


def to_host(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Tensors on the host, with one device-to-host copy for all of them (one wait, not one
    per tensor) when they share a GPU and a dtype."""
    if not tensors[0].is_cuda or len({t.dtype for t in tensors}) > 1:
        return [t.detach().cpu() for t in tensors]
    flat = torch.cat([t.detach().reshape(-1) for t in tensors]).cpu()
    return [
        part.view(t.shape)
        for part, t in zip(flat.split([t.numel() for t in tensors]), tensors, strict=True)
    ]


_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
