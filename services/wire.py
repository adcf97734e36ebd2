"""Conversions between the wire (splitserve.v1 protos, KV store blocks) and the engine's types."""

from __future__ import annotations

import torch

from kvstore.block import BlockMeta, StoredBlock, TensorSpec
from protos.splitserve.v1 import common_pb2 as cpb
from services.engine.errors import InvalidRequestError
from services.engine.kv_transfer import KVBlock, KVLayout
from services.engine.sampler import SampledToken
from services.engine.sampling_params import SamplingParams


def sampling_from_pb(p: cpb.SamplingParams) -> SamplingParams:
    """Validated engine parameters; a bad value raises InvalidRequestError naming it."""
    kw: dict = {
        "max_tokens": int(p.max_tokens) if p.max_tokens else 16,
        "top_k": int(p.top_k),
        "min_p": float(p.min_p),
        "presence_penalty": float(p.presence_penalty),
        "frequency_penalty": float(p.frequency_penalty),
        "stop": tuple(p.stop),
        "stop_token_ids": tuple(int(t) for t in p.stop_token_ids),
        "ignore_eos": bool(p.ignore_eos),
        "min_tokens": int(p.min_tokens),
    }
    for name in ("temperature", "top_p", "repetition_penalty"):
        if p.HasField(name):
            kw[name] = float(getattr(p, name))
    if p.HasField("seed"):
        kw["seed"] = int(p.seed)
    if p.HasField("logprobs"):
        kw["logprobs"] = int(p.logprobs)
    if p.HasField("skip_special_tokens"):
        kw["skip_special_tokens"] = bool(p.skip_special_tokens)
    try:
        return SamplingParams(**kw)
    except (ValueError, TypeError) as e:
        raise InvalidRequestError(str(e)) from None


def sampling_to_pb(s: SamplingParams) -> cpb.SamplingParams:
    p = cpb.SamplingParams(
        max_tokens=s.max_tokens,
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        min_p=s.min_p,
        presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty,
        repetition_penalty=s.repetition_penalty,
        stop=list(s.stop),
        stop_token_ids=list(s.stop_token_ids),
        ignore_eos=s.ignore_eos,
        min_tokens=s.min_tokens,
        skip_special_tokens=s.skip_special_tokens,
    )
    if s.seed is not None:
        p.seed = s.seed
    if s.logprobs is not None:
        p.logprobs = s.logprobs
    return p


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
