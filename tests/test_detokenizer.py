"""IncrementalDetokenizer: whole characters only, exact text, stop strings.

The tokenizer is a byte-level BPE trained here on a few KB of text with a small vocabulary, so
emoji and most CJK characters stay split over several byte tokens -- the case that breaks
naive per-token decoding.
"""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from services.engine.detokenizer import IncrementalDetokenizer

# English repeats, the multi-byte text occurs once: BPE merges by frequency, so with a small
# vocabulary the English words become single tokens while emoji and CJK characters stay split
# into byte tokens (some of which join the tail of one character to the head of the next).
CORPUS = (
    (
        "The quick brown fox jumps over the lazy dog. "
        "Hello world, this is a small corpus for a byte-level tokenizer. "
        "Streaming text must never show half of a character. "
    )
    * 40
    + "日本語のテキストも少し入れます。中文也有一点。 Emoji like 🎉 and 🚀 appear once in a while. "
)

SPECIALS = ["<|endoftext|>", "<|im_end|>"]

TEXTS = [
    "Hello world 🎉🚀 done",
    "日本語と中文の混在テキスト、そして絵文字👩‍👩‍👧も。",
    "The lazy dog saw 🦊 (a fox) and said 你好",
    "plain ascii only, nothing fancy",
    "🎉",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=SPECIALS,
        show_progress=False,
    )
    t.train_from_iterator([CORPUS], trainer)
    return t


def run(
    tok: Tokenizer, ids: list[int], prompt: list[int] | None = None, **kw
) -> tuple[list[str], str, IncrementalDetokenizer]:
    """Push ids one by one until a stop; returns (deltas, finish() output, detokenizer)."""
    d = IncrementalDetokenizer(tok, prompt if prompt is not None else [], **kw)
    deltas = []
    for t in ids:
        step = d.push(t)
        deltas.append(step.text_delta)
        if step.stopped:
            break
    return deltas, d.finish(), d


def test_fixture_splits_characters_across_tokens(tok: Tokenizer) -> None:
    # The premise of the other tests: some single tokens decode to an incomplete character.
    ids = tok.encode("🎉 日本語").ids
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    assert len(ids) > len("🎉 日本語")
    # And one token holding bytes of two different characters.
    assert [tok.decode([i]) for i in tok.encode("日本語").ids].count("\ufffd\ufffd") >= 1


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_are_whole_characters_and_concatenate_to_decode(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text).ids
    prompt = tok.encode("User: write something\nAssistant:").ids
    for p in ([], prompt):
        deltas, tail, d = run(tok, ids, p)
        assert not any("\ufffd" in x for x in deltas)
        # Byte-level BPE keeps every space, so seeding with the prompt changes nothing.
        assert "".join(deltas) + tail == tok.decode(ids) == text
        assert d.text == text and tail == ""


def test_unfinished_character_is_held_then_flushed_like_decode(tok: Tokenizer) -> None:
    ids = tok.encode("ok 🎉").ids[:-1]  # the emoji's last byte never arrives
    # The space shares a token with the emoji's first byte.
    assert [tok.decode([i]) for i in ids] == ["o", "k", " \ufffd", "\ufffd"]
    deltas, tail, _ = run(tok, ids)
    assert "".join(deltas) == "ok"  # the partial emoji and its token's space are held back
    assert "".join(deltas) + tail == tok.decode(ids)  # and flushed as U+FFFD at the end
    assert tail.endswith("\ufffd")


def test_stop_string_spanning_two_tokens(tok: Tokenizer) -> None:
    text = "Hello world, this is it"
    ids = tok.encode(text).ids
    pieces = [tok.decode([i]) for i in ids]
    assert pieces[:3] == ["Hel", "lo", " world"]  # so "lo wo" spans a token boundary
    deltas, tail, d = run(tok, ids, stop=["lo wo"])
    # "lo" was held back (it may start "lo wo"), so it never went out before the match.
    assert "".join(deltas) == "Hel"
    assert d.stopped and d.text == "Hel" and tail == ""
    assert len(deltas) == 3  # stopped on the token completing it


def test_text_after_stop_string_in_the_same_token_is_dropped(tok: Tokenizer) -> None:
    ids = tok.encode("The quick brown fox").ids
    assert tok.decode([ids[1]]) == " quick"  # a single token
    deltas, _, d = run(tok, ids, stop=["ui"])
    assert "".join(deltas) == "The q" and d.stopped
    assert len(deltas) == 2


def test_stop_string_at_the_very_start(tok: Tokenizer) -> None:
    ids = tok.encode("Hello world").ids
    deltas, tail, d = run(tok, ids, stop=["Hel"])
    assert deltas == [""] and d.stopped and d.text == "" and tail == ""


def test_stop_string_made_of_split_multibyte_characters(tok: Tokenizer) -> None:
    ids = tok.encode("go 🚀 now").ids
    deltas, _, d = run(tok, ids, stop=["🚀"])
    assert "".join(deltas) == "go " and d.stopped
    assert not any("\ufffd" in x for x in deltas)


def test_earliest_stop_string_wins(tok: Tokenizer) -> None:
    ids = tok.encode("alpha beta gamma").ids
    _, _, d = run(tok, ids, stop=["gamma", "beta", "ph"])
    assert d.text == "al"


def test_finish_flushes_text_held_for_a_stop_string(tok: Tokenizer) -> None:
    ids = tok.encode("see you later").ids
    assert tok.decode([ids[-1]]) == "ter"
    deltas, tail, d = run(tok, ids, stop=["terrible"])
    # "ter" could begin "terrible", so it waits; at the end it is just text.
    assert "".join(deltas) == "see you la"
    assert tail == "ter" and not d.stopped
    assert d.text == "see you later"


def test_after_a_stop_nothing_more_comes_out(tok: Tokenizer) -> None:
    ids = tok.encode("one two three").ids
    d = IncrementalDetokenizer(tok, [], stop=["two"])
    steps = [d.push(t) for t in ids]
    assert steps[-1].stopped and steps[-1].text_delta == ""
    assert "".join(s.text_delta for s in steps) == "one "
    assert d.finish() == "" and d.text == "one "


def test_special_tokens_skipped_or_kept(tok: Tokenizer) -> None:
    end = tok.token_to_id("<|im_end|>")
    ids = [*tok.encode("hi").ids, end, *tok.encode(" there").ids]
    deltas, tail, _ = run(tok, ids, skip_special_tokens=True)
    assert "".join(deltas) + tail == "hi there"
    deltas, tail, _ = run(tok, ids, skip_special_tokens=False)
    assert "".join(deltas) + tail == "hi<|im_end|> there"
    # A special token can be a stop string when it is not skipped.
    _, _, d = run(tok, ids, stop=["<|im_end|>"], skip_special_tokens=False)
    assert d.stopped and d.text == "hi"


def test_prompt_seeding_keeps_the_leading_space_of_sentencepiece_style_decoders() -> None:
    # Metaspace decoders drop the first token's leading space in tokenizer.decode(); seeded with
    # the prompt, the continuation keeps it, as it reads in context.
    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Metaspace()
    t.decoder = decoders.Metaspace()
    t.train_from_iterator(
        [CORPUS], trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"], show_progress=False)
    )
    prompt = t.encode("The quick brown fox").ids
    gen = t.encode("The quick brown fox jumps over").ids[len(prompt) :]
    assert t.decode(gen) == "jumps over"
    deltas, tail, _ = run(t, gen, prompt)
    assert "".join(deltas) + tail == " jumps over"


def test_prompt_ending_inside_a_character_does_not_leak_prompt_text(tok: Tokenizer) -> None:
    ids = tok.encode("x 🎉 y").ids
    cut = next(i for i in range(1, len(ids)) if tok.decode(ids[:i]).endswith("\ufffd"))
    prompt, gen = ids[:cut], ids[cut:]
    deltas, tail, _ = run(tok, gen, prompt)
    # The emoji's first bytes belong to the prompt: the output is what decode(gen) says.
    assert "".join(deltas) + tail == tok.decode(gen)
    assert not "".join(deltas).startswith("x")


def test_non_monotonic_decoder_restarts_instead_of_failing() -> None:
    # A decoder that rewrites "ab" as "X" across tokens contradicts text already released;
    # DecodeStream raises, and the detokenizer restarts after the released text.
    t = Tokenizer(models.WordLevel({"a": 0, "b": 1, "c": 2, "d": 3}, unk_token="a"))
    t.decoder = decoders.Sequence([decoders.Fuse(), decoders.Replace("ab", "X")])
    deltas, tail, _ = run(t, [0, 1, 2, 0, 1], [3, 3])
    assert "".join(deltas) + tail == "abcab"
