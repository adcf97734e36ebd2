"""A model directory's tokenizer and chat template, loaded through transformers from local files."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.engine.errors import ModelLoadError

if TYPE_CHECKING:
    import tokenizers
    import transformers

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class Tokenizer:
    """transformers' tokenizer for one model dir, plus the ids that end a generation."""

    hf: transformers.PreTrainedTokenizerBase

    def __init__(
        self,
        hf: transformers.PreTrainedTokenizerBase,
        generation_eos_ids: Sequence[int] = (),
        model_dir: Path | None = None,
    ) -> None:
        if getattr(hf, "backend_tokenizer", None) is None:
            raise ModelLoadError(
                f"{model_dir or 'tokenizer'} has no fast (tokenizer.json) tokenizer; "
                "save one with transformers' AutoTokenizer.save_pretrained"
            )
        self.hf = hf
        self.model_dir = model_dir
        ids: list[int] = []
        for t in (hf.eos_token_id, *generation_eos_ids):
            if t is not None and int(t) not in ids:
                ids.append(int(t))
        self._eos_token_ids = tuple(ids)

    @property
    def class_name(self) -> str:
        """transformers' class behind it, by which load_tokenizer finds it again."""
        return type(self.hf).__name__

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The Rust tokenizer, e.g. for tokenizers.decoders.DecodeStream."""
        return self.hf.backend_tokenizer

    @property
    def vocab_size(self) -> int:
        # len() counts added tokens (specials), which the base vocab_size may leave out.
        return len(self.hf)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos_token_ids

    @property
    def has_chat_template(self) -> bool:
        return bool(self.hf.chat_template)

    def encode(self, text: str) -> list[int]:
        """Ids exactly as transformers gives them, default special-token handling included."""
        return list(self.hf(text)["input_ids"])

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        # No space cleanup: streamed text (DecodeStream) never gets it, and the final text must
        # equal the concatenation of the streamed pieces.
        return self.hf.decode(
            list(ids),
            skip_special_tokens=skip_special_tokens,
            clean_up_tokenization_spaces=False,
        )

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes one token stands for. A byte-level token can hold part of a UTF-8
        character, which decode() shows as U+FFFD; clients piece such tokens together from
        their bytes (OpenAI's logprobs `bytes` field)."""
        piece = self.hf.convert_ids_to_tokens(int(token_id))
        if piece is None or int(token_id) in self.hf.all_special_ids:
            return self.decode([token_id], skip_special_tokens=False).encode()
        kind = self._decoder_kinds()
        if "ByteLevel" in kind:
            table = _byte_decoder()
            if all(c in table for c in piece):
                return bytes(table[c] for c in piece)
        if "ByteFallback" in kind and len(piece) == 6 and piece.startswith("<0x"):
            return bytes([int(piece[3:5], 16)])  # SentencePiece's byte tokens: <0xE2>
        if "Metaspace" in kind or "Replace" in kind:
            return piece.replace("\u2581", " ").encode()
        return self.decode([token_id], skip_special_tokens=False).encode()

    def _decoder_kinds(self) -> set[str]:
        if not hasattr(self, "_kinds"):
            spec = json.loads(self.backend.to_str()).get("decoder") or {}
            parts = spec.get("decoders", [spec]) if spec.get("type") == "Sequence" else [spec]
            self._kinds = {d.get("type", "") for d in parts}
        return self._kinds

    def render_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        if not self.has_chat_template:
            raise ModelLoadError(
                f"{self.model_dir or 'this tokenizer'} has no chat template; "
                "send a plain completion prompt or use an instruct model"
            )
        try:
            return self.hf.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as e:  # jinja errors carry the template's own message
            raise ModelLoadError(f"chat template failed to render: {e}") from None

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True
    ) -> list[int]:
        text = self.render_chat(messages, add_generation_prompt)
        # The template writes its own special tokens (BOS included), so none are added here;
        # this is what transformers' own tokenize=True path does.
        return list(self.hf(text, add_special_tokens=False)["input_ids"])


def load_tokenizer(
    model_dir: str | Path, require_chat_template: bool = False, tokenizer_class: str | None = None
) -> Tokenizer:
    """tokenizer_class: the class AutoTokenizer picks for this directory (Tokenizer.class_name
    of an earlier load), to load it without AutoTokenizer; None lets AutoTokenizer choose."""
    path = Path(model_dir)
    if not path.is_dir():
        raise ModelLoadError(f"model directory not found: {path}")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ModelLoadError(
            f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); "
            "copy them from the original model"
        )
    try:
        hf = _tokenizer_class(tokenizer_class).from_pretrained(str(path), local_files_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"cannot load the tokenizer in {path}: {first}") from None
    tok = Tokenizer(hf, _generation_eos_ids(path), path)
    if require_chat_template and not tok.has_chat_template:
        raise ModelLoadError(
            f"{path} has no chat template (tokenizer_config.json or chat_template.jinja); "
            "use an instruct model or send plain completion prompts"
        )
    return tok


def _tokenizer_class(name: str | None) -> type:
    """transformers' tokenizer class by name, else AutoTokenizer. AutoTokenizer chooses by
    tokenizer_config.json and the model type, and to do so imports transformers' model
    configs and with them torch; a process that only tokenizes (the router) gets the class
    that AutoTokenizer chose elsewhere (Tokenizer.class_name) and loads no torch."""
    import transformers

    cls = getattr(transformers, name, None) if name else None
    if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedTokenizerBase):
        return cls
    return transformers.AutoTokenizer


def _generation_eos_ids(path: Path) -> list[int]:
    gen = path / "generation_config.json"
    if not gen.is_file():
        return []
    try:
        eos = json.loads(gen.read_text()).get("eos_token_id")
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{gen} is not valid JSON: {e}") from None
    if eos is None:
        return []
    return [int(t) for t in (eos if isinstance(eos, list) else [eos])]


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte."""
    global _BYTE_DECODER
    if _BYTE_DECODER is None:
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        _BYTE_DECODER = {c: b for b, c in bytes_to_unicode().items()}
    return _BYTE_DECODER


_BYTE_DECODER: dict[str, int] | None = None
