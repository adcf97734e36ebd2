"""services.engine.tokenizer: transformers' tokenizer behind a small, engine-shaped API."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import tokenizers
from tokenizers.decoders import DecodeStream

from services.engine.errors import ModelLoadError
from services.engine.tokenizer import Tokenizer, load_tokenizer

TEXTS = [
    "Hello world",
    "The capital of France is Paris.",
    "emoji 🦀👨‍👩‍👧 and 中文 and \x00\x1b control",
    "  spaces   and\ttabs\n",
    "<|im_start|>literal special tokens<|im_end|>",
]


@pytest.fixture(scope="module")
def tok(tiny_model_dir: Path) -> Tokenizer:
    return load_tokenizer(tiny_model_dir)


def test_encode_is_exactly_transformers(tok: Tokenizer, tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    for text in TEXTS:
        assert tok.encode(text) == hf(text)["input_ids"]


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "qwen2_model_dir", "llama31_model_dir"])
def test_loaded_by_class_name_as_autotokenizer_would(fixture, request) -> None:
    """A router loads the class AutoTokenizer chose (its name travels in the router's config;
    AutoTokenizer itself would import torch): the same class, ids and chat text."""
    from transformers import AutoTokenizer

    model_dir = request.getfixturevalue(fixture)
    hf = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    name = load_tokenizer(model_dir).class_name
    ours = load_tokenizer(model_dir, tokenizer_class=name)
    assert type(ours.hf) is type(hf)
    for text in TEXTS:
        assert ours.encode(text) == hf(text)["input_ids"]
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    if hf.chat_template:
        assert ours.render_chat(chat) == hf.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=True
        )


def test_a_class_name_transformers_lacks_falls_back_to_autotokenizer(tiny_model_dir) -> None:
    tok = load_tokenizer(tiny_model_dir, tokenizer_class="NoSuchTokenizerClass")
    assert tok.class_name == load_tokenizer(tiny_model_dir).class_name


def test_properties(tok: Tokenizer) -> None:
    assert isinstance(tok.backend, tokenizers.Tokenizer)
    assert tok.vocab_size == 2048
    # <|im_end|> from the tokenizer, then <|endoftext|> from generation_config.json.
    assert tok.eos_token_ids == (2, 0)
    assert tok.has_chat_template


def test_decode_round_trip_and_special_tokens(tok: Tokenizer) -> None:
    for text in TEXTS[:4]:
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids) == "user\nhi"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"
    # No cleanup of spaces before punctuation: the text comes back byte for byte.
    assert tok.decode(tok.encode("a , b . c ?")) == "a , b . c ?"


def test_streaming_decode_matches_full_decode(tok: Tokenizer) -> None:
    text = "Streaming 🇫🇷 café, 日本語 and 👍🏽 done."
    ids = tok.encode(text)
    stream = DecodeStream(skip_special_tokens=True)
    pieces = [stream.step(tok.backend, i) for i in ids]
    assert "".join(p for p in pieces if p) == tok.decode(ids) == text


def test_apply_chat_template(tok: Tokenizer) -> None:
    messages = [{"role": "user", "content": "What is 7 times 8?"}]
    ids = tok.apply_chat_template(messages)
    expected = tok.hf.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=False
    )
    assert ids == list(expected)
    assert tok.decode(ids, skip_special_tokens=False) == (
        "<|im_start|>user\nWhat is 7 times 8?<|im_end|>\n<|im_start|>assistant\n"
    )
    closed = tok.apply_chat_template(messages, add_generation_prompt=False)
    assert ids[: len(closed)] == closed and len(closed) < len(ids)


def test_missing_and_unloadable(tmp_path: Path, tiny_model_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no tokenizer files"):
        load_tokenizer(tmp_path / "empty")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "tokenizer.json").write_text("{ not json")
    with pytest.raises(ModelLoadError, match="cannot load the tokenizer"):
        load_tokenizer(broken)


def test_no_chat_template(tmp_path: Path, tiny_model_dir: Path) -> None:
    plain = tmp_path / "plain"
    shutil.copytree(tiny_model_dir, plain)
    cfg = json.loads((plain / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (plain / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(plain)  # fine until a chat template is needed
    assert not tok.has_chat_template
    assert tok.encode("hi") == load_tokenizer(tiny_model_dir).encode("hi")
    with pytest.raises(ModelLoadError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(ModelLoadError, match="no chat template"):
        load_tokenizer(plain, require_chat_template=True)


def test_qwen2_tokenizer(qwen2_model_dir: Path) -> None:
    tok = load_tokenizer(qwen2_model_dir)
    raw = tokenizers.Tokenizer.from_file(str(qwen2_model_dir / "tokenizer.json"))
    text = "In 2024 the price was 1,299.99 dollars."
    assert tok.encode(text) == raw.encode(text).ids
    assert tok.decode(tok.encode(text)) == text
    assert tok.eos_token_ids == (2, 0)


def test_token_bytes_byte_level(tok: Tokenizer) -> None:
    # The tiny preset splits the emoji over three byte-level tokens: decode() shows U+FFFD for
    # each part, token_bytes() gives the UTF-8 bytes they hold.
    ids = tok.encode("café 🙂 x")
    parts = [tok.token_bytes(i) for i in ids]
    assert b"".join(parts) == "café 🙂 x".encode()
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # the case this exists for
    assert (
        tok.token_bytes(tok.eos_token_ids[0])
        == tok.decode([tok.eos_token_ids[0]], skip_special_tokens=False).encode()
    )


def test_token_bytes_sentencepiece_byte_fallback(tmp_path: Path) -> None:
    # A SentencePiece-style tokenizer (Metaspace, byte fallback): "▁" is a space and <0xNN>
    # tokens are single bytes.
    from tokenizers import decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "\u2581hi": 3, "\u2581": 4}
    vocab |= {f"<0x{b:02X}>": 5 + b for b in range(256)}
    t = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>",
                                        byte_fallback=True))  # fmt: skip
    t.normalizer = normalizers.Replace(" ", "\u2581")
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never")
    t.decoder = decoders.Sequence([
        decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
    ])  # fmt: skip
    hf = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", bos_token="<s>",
                                 eos_token="</s>")  # fmt: skip
    tk = Tokenizer(hf)
    ids = [3, 4, 5 + 0xC3, 5 + 0xA9]  # "▁hi", "▁", <0xC3>, <0xA9>
    assert [tk.token_bytes(i) for i in ids] == [b" hi", b" ", b"\xc3", b"\xa9"]
    assert tk.decode(ids) == " hi é"
