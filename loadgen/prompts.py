"""Prompts of exact token counts, synthesized with the target model's tokenizer.

Traces give lengths, never text. A prompt here is a run of "words": vocabulary entries that
decode to a space and lowercase letters and that encode back to themselves. A byte-level or
SentencePiece pre-tokenizer splits text at those spaces, so any concatenation of pool words
encodes to exactly one token per word; the pool is checked for that once, on a long mixed run.

Prefix sharing (Mooncake's `hash_ids`): a block id always expands to the same words, so two
prompts whose leading block ids agree share exactly that token prefix; a partial last block is
a prefix of its full block. Prompts of traces without block ids get their own random words,
so they share nothing by accident (beyond a chat template's fixed head).

Without a tokenizer, a fixed English word list is used: one word is one token for most BPE
vocabularies, but the count is then approximate (`PromptFactory.exact` is False).
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from services.engine.tokenizer import Tokenizer

_WORD = re.compile(r"^ [a-z]{2,12}$")
MAX_POOL = 4096
_FALLBACK = (
    "the of and to in is was for that with as on by at from his her an are which this be had "
    "not or have were but its they all one their has been new more also who first after two "
    "time other into can when only over may most some there would these made many year such "
    "city part where people between under world through state school during while three war "
    "area work well found since both later known used before being number house name film"
)


@dataclass(frozen=True)
class Prompt:
    """One request's prompt: text pieces (joined at send time, so shared blocks are shared
    strings) or token ids, and its token count."""

    parts: tuple[str, ...] = ()
    ids: tuple[int, ...] | None = None
    chat: bool = False
    num_tokens: int = 0

    @property
    def text(self) -> str:
        return "".join(self.parts)


class PromptFactory:
    """Builds `Prompt`s. `mode`: "text" (completions prompt string), "ids" (completions token
    ids; exact on any server that takes ids) or "chat" (one user message; the chat template's
    own tokens are subtracted so the templated prompt has the asked length)."""

    def __init__(
        self,
        tokenizer: Tokenizer | None = None,
        mode: str = "text",
        seed: int = 0,
        block_tokens: int = 0,
    ) -> None:
        if mode not in ("text", "ids", "chat"):
            raise ValueError(f"prompt mode must be text, ids or chat, got {mode!r}")
        if mode == "ids" and tokenizer is None:
            raise ValueError("token-id prompts need the model's tokenizer (--tokenizer DIR)")
        self.mode, self.seed, self.block_tokens = mode, seed, block_tokens
        self.tokenizer = tokenizer
        if tokenizer is None:
            self.words = [" " + w for w in _FALLBACK.split()]
            self.word_ids: list[int] = []
        else:
            self.words, self.word_ids = _word_pool(tokenizer)
        self.overhead = self._chat_overhead() if mode == "chat" else 0
        self._blocks: dict[int, np.ndarray] = {}

    @property
    def exact(self) -> bool:
        return self.tokenizer is not None

    def _chat_overhead(self) -> int:
        """Tokens the chat template adds around a user message."""
        if self.tokenizer is None:
            return 0
        sample = "".join(self.words[:8])
        ids = self.tokenizer.apply_chat_template([{"role": "user", "content": sample}])
        return len(ids) - 8

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, *key])

    def _block(self, hash_id: int) -> np.ndarray:
        b = self._blocks.get(hash_id)
        if b is None:
            # A separate stream per block id: the same id gives the same words in every run.
            b = self._blocks[hash_id] = self._rng(1, hash_id).integers(
                0, len(self.words), self.block_tokens
            )
        return b

    def build(self, index: int, num_tokens: int, hash_ids: tuple[int, ...] = ()) -> Prompt:
        """The prompt of request `index` with `num_tokens` tokens (after any chat template)."""
        n = max(1, num_tokens - self.overhead)
        if hash_ids and self.block_tokens:
            pieces = []
            left = n
            for h in hash_ids:
                if left <= 0:
                    break
                take = min(left, self.block_tokens)
                pieces.append(self._block(h)[:take])
                left -= take
            if left > 0:  # a prompt longer than its blocks (after scaling): unique filler
                pieces.append(self._rng(2, index).integers(0, len(self.words), left))
            idx = np.concatenate(pieces)
        else:
            idx = self._rng(3, index).integers(0, len(self.words), n)
        total = n + self.overhead
        if self.mode == "ids":
            ids = np.asarray(self.word_ids)[idx]
            return Prompt(ids=tuple(ids.tolist()), num_tokens=total)
        words = self.words
        return Prompt(
            parts=("".join([words[i] for i in idx.tolist()]),),
            chat=self.mode == "chat",
            num_tokens=total,
        )

    def count(self, prompt: Prompt) -> int:
        """Tokens the target tokenizer really gives the prompt (for checks, not the hot path)."""
        if self.tokenizer is None:
            return len(prompt.text.split())
        if prompt.ids is not None:
            return len(prompt.ids)
        if prompt.chat:
            msgs = [{"role": "user", "content": prompt.text}]
            return len(self.tokenizer.apply_chat_template(msgs))
        return len(self.tokenizer.encode(prompt.text))


def _word_pool(tok: Tokenizer) -> tuple[list[str], list[int]]:
    hf = tok.hf
    texts = hf.batch_decode([[i] for i in range(tok.vocab_size)], skip_special_tokens=True)
    cand = [(t, i) for i, t in enumerate(texts) if _WORD.match(t)]
    cand.sort(key=lambda x: (zlib.crc32(x[0].encode()), x[1]))  # a stable, spread-out choice
    enc = hf([t for t, _ in cand], add_special_tokens=False)["input_ids"]
    pool = [(t, i) for (t, i), e in zip(cand, enc, strict=True) if e == [i]][:MAX_POOL]
    if len(pool) < 16:
        raise ValueError(
            f"the tokenizer of {tok.model_dir} has only {len(pool)} plain-word tokens; cannot "
            "synthesize exact prompts with it"
        )
    words, ids = [t for t, _ in pool], [i for _, i in pool]
    # The whole pool in a mixed order, twice: every word after many others, encoded at once.
    order = np.random.default_rng(0).permutation(len(words) * 2) % len(words)
    got = hf("".join(words[i] for i in order), add_special_tokens=False)["input_ids"]
    if got != [ids[i] for i in order]:
        raise ValueError(
            f"the tokenizer of {tok.model_dir} merges across word boundaries; exact-length "
            "prompts cannot be made from its words"
        )
    specials = len(tok.encode(words[0])) - 1
    if specials:
        # encode() adds BOS/EOS to every text prompt: the server counts them as prompt tokens.
        raise ValueError(
            f"the tokenizer of {tok.model_dir} adds {specials} special token(s) to every text; "
            "use --prompt-format ids or chat"
        )
    return words, ids
