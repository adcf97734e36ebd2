"""Multi-turn sessions: conversations whose every turn resends the conversation so far.

With sessions on, each request of the replayed trace (or synthetic process) starts a
conversation at its arrival time. A conversation has K turns, K geometric with mean `turns`
(FastSwitch's Multi-Round ShareGPT averages 5.5). Turn j > 0 is sent `think_s` after turn j - 1
ended (closed loop within a conversation, open loop across them); its new message and answer
lengths are those of a request drawn from the replayed ones (seeded), so turns keep the trace's
length distribution. Its prompt is the whole conversation: every earlier prompt and answer,
then the new message, so turn j's prompt starts with turn j - 1's prompt exactly (a prefix
cache, or FastSwitch's multi-turn KV reuse, has something to reuse).

The answers a client resends are stand-ins of the answer's length, not the text the model
wrote: the prompt synthesizer has no model. So the prefix shared with the previous turn is its
prompt, not its answer.

Prompt text: conversation c is one endless stream of synthetic words (prefix blocks with ids
unique to c, `BLOCK_TOKENS` tokens each); a turn's prompt is the stream's first L tokens. A
conversation ends early when its next prompt would exceed `max_prompt_tokens`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

BLOCK_TOKENS = 16
_ID_STRIDE = 1 << 24  # block ids per conversation: 16 * 2^24 tokens, more than any context


@dataclass(frozen=True)
class Sessions:
    turns: float  # mean turns per conversation (>= 1)
    think_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.turns >= 1:
            raise ValueError(f"mean turns per session must be >= 1, got {self.turns}")
        if not self.think_s >= 0:
            raise ValueError(f"think time must be >= 0 s, got {self.think_s}")

    @classmethod
    def parse(cls, spec: str) -> Sessions:
        """`TURNS[:THINK_S]`: mean turns per conversation, seconds between an answer and the
        next message."""
        parts = spec.split(":")
        try:
            if 1 <= len(parts) <= 2:
                return cls(float(parts[0]), float(parts[1]) if len(parts) > 1 else 0.0)
        except ValueError as e:
            raise ValueError(f"bad sessions {spec!r}: TURNS[:THINK_S] ({e})") from None
        raise ValueError(f"bad sessions {spec!r}: TURNS[:THINK_S]")


@dataclass(frozen=True, slots=True)
class Turn:
    """One turn: its conversation, its place in it, and its prompt and answer lengths."""

    row: int  # the request (of the replayed ones) that gave this turn its lengths
    session: int
    turn: int
    prompt_tokens: int  # the whole conversation so far plus the new message
    output_tokens: int


def conversations(
    lengths: list[tuple[int, int]],
    s: Sessions,
    seed: int,
    max_prompt_tokens: int | None = None,
) -> list[list[Turn]]:
    """One conversation per row of `lengths` ((message, answer) tokens), in row order."""
    rng = np.random.default_rng([seed, 5])
    n = len(lengths)
    if n == 0:
        return []
    # Geometric on {1, 2, ...} with mean `turns`; turns = 1 gives single-turn conversations.
    ks = rng.geometric(1.0 / s.turns, n) if s.turns > 1 else np.ones(n, dtype=np.int64)
    cap = max_prompt_tokens if max_prompt_tokens is not None else math.inf
    out = []
    for c, (msg0, ans0) in enumerate(lengths):
        first = Turn(c, c, 0, min(msg0, cap) if math.isfinite(cap) else msg0, ans0)
        turns = [first]
        ctx = first.prompt_tokens + ans0
        draws = rng.integers(0, n, int(ks[c]) - 1)
        for j, r in enumerate(draws.tolist(), 1):
            msg, ans = lengths[r]
            if ctx + msg > cap:
                break
            turns.append(Turn(r, c, j, ctx + msg, ans))
            ctx += msg + ans
        out.append(turns)
    return out


def block_ids(session: int, prompt_tokens: int, block_tokens: int = BLOCK_TOKENS) -> tuple:
    """The prefix-block ids of a conversation's first `prompt_tokens` tokens."""
    base = (session + 1) * _ID_STRIDE
    return tuple(range(base, base + math.ceil(prompt_tokens / block_tokens)))
