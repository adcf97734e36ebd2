"""What a request must be before an engine queues it: each rule with the message a caller
gets (InvalidRequestError, which the services map to HTTP 400 / INVALID_ARGUMENT)."""

from __future__ import annotations

from services.engine.errors import InvalidRequestError
from services.engine.request import MAX_PRIORITY
from services.engine.sampling_params import SamplingParams


def check_priority(priority) -> int:
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise InvalidRequestError(f"priority must be an integer, got {priority!r}")
    if not 0 <= priority <= MAX_PRIORITY:
        raise InvalidRequestError(f"priority must be within [0, {MAX_PRIORITY}], got {priority}")
    return priority


MAX_CACHE_SALT = 256  # characters; a scope's name, not data


def check_cache_salt(salt) -> str:
    if not isinstance(salt, str):
        raise InvalidRequestError(f"cache_salt must be a string, got {type(salt).__name__}")
    if len(salt) > MAX_CACHE_SALT:
        raise InvalidRequestError(
            f"cache_salt has {len(salt)} characters; at most {MAX_CACHE_SALT}"
        )
    return salt


def check_request(
    prompt: list[int], params: SamplingParams, num_done: int, *, vocab_size: int,
    max_model_len: int, block_size: int, pool_blocks: int, can_borrow: bool,
) -> None:  # fmt: skip
    """num_done: output tokens generated elsewhere already; can_borrow: the engine may hold
    KV beyond its pool (lent memory)."""
    if not prompt:
        raise InvalidRequestError("prompt is empty: give at least one token")
    bad = next((t for t in prompt if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequestError(f"token id {bad} is outside the vocabulary [0, {vocab_size})")
    if len(prompt) >= max_model_len:
        raise InvalidRequestError(
            f"prompt has {len(prompt)} tokens; the context holds {max_model_len} "
            "including at least one generated token"
        )
    total = len(prompt) + params.max_tokens
    if total > max_model_len:
        raise InvalidRequestError(
            f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) = {total} "
            f"exceeds the context length {max_model_len}"
        )
    if num_done >= params.max_tokens:
        raise InvalidRequestError("the request has already generated max_tokens tokens")
    need = -(-total // block_size)
    if need > pool_blocks and not can_borrow:
        raise InvalidRequestError(
            f"the request needs {need} KV blocks at most; this engine has {pool_blocks}"
        )
