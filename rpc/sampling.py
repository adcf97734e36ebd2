"""Sampling parameters on the wire (splitserve.v1.SamplingParams).

Both sides build their own type from the fields: the engine's SamplingParams validates them, so
this codec only moves values and never judges them. Fields the proto marks `optional` (their
natural default isn't zero) are left out of the fields when unset, so the receiver's defaults
apply.
"""

from __future__ import annotations

from typing import Any, Protocol

from protos.splitserve.v1 import common_pb2 as cpb

# Plain scalars and lists: zero/empty on the wire means zero/empty.
_PLAIN = ("presence_penalty", "frequency_penalty", "ignore_eos", "min_tokens")
# Scalars whose unset state means "the receiver's default".
_OPTIONAL = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "seed",
    "logprobs",
    "skip_special_tokens",
)


class Sampling(Protocol):
    """What sampling_to_pb reads (the engine's SamplingParams has all of it)."""

    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float
    seed: int | None
    stop: tuple[str, ...]
    stop_token_ids: tuple[int, ...]
    ignore_eos: bool
    min_tokens: int
    logprobs: int | None
    skip_special_tokens: bool


def sampling_fields(p: cpb.SamplingParams, default_max_tokens: int = 16) -> dict[str, Any]:
    """Keyword arguments for the receiver's sampling type. Unset fields are left out (the
    receiver's defaults apply); max_tokens 0 means unset."""
    kw: dict[str, Any] = {name: getattr(p, name) for name in _PLAIN}
    kw["max_tokens"] = int(p.max_tokens) if p.max_tokens else default_max_tokens
    kw["stop"] = tuple(p.stop)
    kw["stop_token_ids"] = tuple(int(t) for t in p.stop_token_ids)
    for name in _OPTIONAL:
        if p.HasField(name):
            kw[name] = getattr(p, name)
    return kw


def sampling_to_pb(s: Sampling) -> cpb.SamplingParams:
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
