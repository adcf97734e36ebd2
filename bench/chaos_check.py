"""How a stream the client received compares with the uninterrupted reference, token by token.

A resumption that repeats tokens already delivered shows as a span equal to the tokens just
before it, inserted where the received stream first departs from the reference: those tokens
are counted as duplicated (as often as it happens), and the rest is compared position by
position. Tokens that differ from the reference, or go past its end, are wrong; a stream that
ends short has the remainder missing (a failed request's missing tail is its failure, not
wrong tokens)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class TokenCheck:
    wrong: int = 0
    duplicated: int = 0
    missing: int = 0

    @property
    def exact(self) -> bool:
        return not (self.wrong or self.duplicated or self.missing)


def _common_prefix(a: Sequence, b: Sequence) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _repeat_at(got: Sequence, ref: Sequence, p: int) -> int:
    """The length d of a span at p that repeats the d tokens before it and whose removal lets
    the stream go on matching the reference (0: none). The shortest such span wins."""
    for d in range(1, p + 1):
        if list(got[p : p + d]) != list(got[p - d : p]):
            continue
        rest = got[p + d :]
        if not rest or _common_prefix(rest, ref[p:]) > 0 or p >= len(ref):
            return d
    return 0


def compare(received: Sequence, reference: Sequence) -> TokenCheck:
    got = list(received)
    duplicated = 0
    while True:
        p = _common_prefix(got, reference)
        if p == len(got):
            break
        d = _repeat_at(got, reference, p)
        if not d:
            break
        duplicated += d
        del got[p : p + d]
    n = min(len(got), len(reference))
    wrong = sum(1 for i in range(n) if got[i] != reference[i]) + max(0, len(got) - len(reference))
    return TokenCheck(wrong, duplicated, max(0, len(reference) - len(got)))
