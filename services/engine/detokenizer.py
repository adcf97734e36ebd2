"""Incremental detokenization with stop strings: text deltas that are always whole characters.

Decoding goes through `tokenizers.decoders.DecodeStream`, which re-decodes a short window of
recent tokens and releases text only when it no longer ends in U+FFFD, i.e. when every UTF-8
character split across byte-level tokens is complete. That is the prefix/read-offset method
(vLLM, TGI) done in Rust, and it is correct for byte-level BPE merges across tokens because
the window is decoded as one byte string.

Leading space: the stream is seeded with the prompt's last few tokens, so the first generated
token decodes as it would in context. For byte-level BPE (GPT-2, Llama 3, SmolLM) that equals
tokenizer.decode(generated ids) exactly; for SentencePiece-style decoders that strip the first
token's leading space, the generated text keeps it, as vLLM does.

Stop strings: the tail of the text that could still grow into a stop string is held back; when
a stop string appears (possibly spanning tokens) the text is cut before it, and the rest of
that token's text is dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import tokenizers
from tokenizers.decoders import DecodeStream

# Prompt tokens the stream is seeded with (vLLM's and SGLang's offset is 5 too): enough for any
# decoder's leading-space rule, few enough that seeding costs nothing.
_CONTEXT_TOKENS = 5

# tokenizers raises this untyped; the message is the only way to tell it from a real error.
# It means the decoder rewrote already-released text (a non-monotonic decoder).
_INVALID_PREFIX = "Invalid prefix encountered"

_REPLACEMENT = "\ufffd"


@dataclass
class DetokenizerStep:
    text_delta: str  # new text safe to emit now
    stopped: bool  # a stop string matched; text is cut before it (it is not emitted)


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        prompt_token_ids: Sequence[int],
        stop: Sequence[str] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._stop = tuple(s for s in stop if s)
        context = [int(t) for t in prompt_token_ids[-_CONTEXT_TOKENS:]]
        # A prompt that ends inside a character (or on a literal U+FFFD) cannot seed the stream:
        # DecodeStream would take the whole seed as unreleased and later emit prompt text.
        if context and self._decode(context).endswith(_REPLACEMENT):
            context = []
        self._ids: list[int] = list(context)  # seed + generated ids
        self._released = len(context)  # ids[:_released] have all their text in _text
        self._stream = DecodeStream(ids=context, skip_special_tokens=skip_special_tokens)
        self._text = ""  # generated text, cut before a stop string once one matched
        self._emitted = 0  # length of the prefix of _text handed out
        self._stopped = False
        self._finished = False

    @property
    def text(self) -> str:
        """All text emitted or held so far (after a stop: everything before the stop string)."""
        return self._text

    @property
    def stopped(self) -> bool:
        return self._stopped

    def push(self, token_id: int) -> DetokenizerStep:
        if self._stopped or self._finished:
            return DetokenizerStep("", self._stopped)
        self._ids.append(int(token_id))
        piece = self._step(int(token_id))
        if piece is None:  # an unfinished character, or a skipped special token
            return DetokenizerStep("", False)
        self._released = len(self._ids)
        return self._accept(piece, final=False)

    def finish(self) -> str:
        """At the end of generation (no stop hit): the held-back text, now safe to emit.

        Bytes of a character that never completed come out as U+FFFD, as in
        tokenizer.decode(); a stop string inside the flushed tail still cuts it.
        """
        if self._stopped or self._finished:
            return ""
        self._finished = True
        return self._accept(self._unreleased_text(), final=True).text_delta

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=self._skip_special)

    def _step(self, token_id: int) -> str | None:
        try:
            return self._stream.step(self._tokenizer, token_id)
        except Exception as err:
            if not str(err).startswith(_INVALID_PREFIX):
                raise
        # The decoder changed text it had already released (e.g. a decoder that rewrites across
        # token boundaries). Released text cannot be taken back: restart the stream after it,
        # first with released tokens as context, then, if that fails the same way, with none.
        pending = self._ids[self._released :]
        context = self._ids[max(0, self._released - _CONTEXT_TOKENS) : self._released]
        for seed in (context, []):
            self._stream = DecodeStream(ids=seed, skip_special_tokens=self._skip_special)
            try:
                return self._stream.step(self._tokenizer, pending)
            except Exception as err:
                if not str(err).startswith(_INVALID_PREFIX):
                    raise
        raise AssertionError("a decode stream with no context has no prefix to contradict")

    def _unreleased_text(self) -> str:
        """Text of the ids the stream still holds, decoded after the released ones."""
        pending = self._ids[self._released :]
        if not pending:
            return ""
        context = self._ids[max(0, self._released - _CONTEXT_TOKENS) : self._released]
        head = self._decode(context)
        full = self._decode(context + pending)
        return full[len(head) :] if full.startswith(head) else self._decode(pending)

    def _accept(self, piece: str, final: bool) -> DetokenizerStep:
        start = len(self._text)
        self._text += piece
        cut = self._find_stop(start)
        if cut is not None:
            self._text = self._text[:cut]
            self._stopped = True
            safe = cut
        elif final:
            safe = len(self._text)
        else:
            safe = len(self._text) - self._held_back()
        # A stop match or a held tail never begins inside text already emitted: that text was
        # released only because no stop string could start there.
        delta = self._text[self._emitted : safe]
        self._emitted = max(self._emitted, safe)
        return DetokenizerStep(delta, self._stopped)

    def _find_stop(self, start: int) -> int | None:
        """Start of the earliest stop string that ends in the text added at `start`."""
        best: int | None = None
        for s in self._stop:
            at = self._text.find(s, max(0, start - len(s) + 1))
            if at != -1 and (best is None or at < best):
                best = at
        return best

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        text = self._text
        held = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(text)), held, -1):
                if text.endswith(s[:n]):
                    held = n
                    break
        return held
