"""Per-request sampling parameters, validated once at the edge of the engine."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from services.engine.errors import InvalidRequestError


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop.

    temperature == 0 means greedy. `seed` makes sampling a function of (seed, output position)
    only, so the same seed gives the same tokens whatever else shares the batch, across
    preemption and across a prefill/decode hand-off.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None  # None: no logprobs; 0: the chosen token's; n: plus the top n
    skip_special_tokens: bool = True

    # Filled by the engine from the tokenizer/generation config; not a user knob.
    eos_token_ids: tuple[int, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise InvalidRequestError(msg)

        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            bad(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if self.temperature < 0:
            bad(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            bad(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            bad(f"top_k must be -1, 0 (disabled) or positive, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            bad(f"min_p must be in [0, 1], got {self.min_p}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            bad(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            bad(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if self.repetition_penalty <= 0:
            bad(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            bad(f"min_tokens must be in [0, max_tokens], got {self.min_tokens}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            bad(f"logprobs must be in [0, 20], got {self.logprobs}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop strings must be non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids must be non-negative integers")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def max_stop_len(self) -> int:
        return max((len(s) for s in self.stop), default=0)


# Keys of a Hugging Face generation_config.json that are sampling defaults, and ours for them.
_GENERATION_KEYS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}


@dataclass(frozen=True)
class SamplingDefaults:
    """What a request gets for the sampling fields it leaves unset, per model.

    Layers, last wins: these built-in values (the OpenAI API's; max_tokens is a cap for chats
    that name none, so an unbounded request can't run to the end of a long context), the model
    directory's generation_config.json (from_model_dir), the operator's app config (merged).
    """

    max_tokens: int = 1024
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        SamplingParams(**self.fields(), max_tokens=self.max_tokens)  # the same rules, same errors

    def fields(self) -> dict:
        """The sampling fields (max_tokens aside), as SamplingParams keywords."""
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty,
        }

    def merged(self, **overrides) -> SamplingDefaults:
        """These defaults with every override that is not None."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> SamplingDefaults:
        """The built-in defaults under what the model's generation_config.json says: its
        sampling keys, and greedy where it sets do_sample false (Hugging Face's meaning)."""
        path = Path(model_dir) / "generation_config.json"
        if not path.is_file():
            return cls()
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise InvalidRequestError(f"{path} is not valid JSON: {e}") from None
        found = {ours: raw[k] for k, ours in _GENERATION_KEYS.items() if raw.get(k) is not None}
        if raw.get("do_sample") is False:
            found["temperature"] = 0.0
        try:
            return cls().merged(**found)
        except (InvalidRequestError, TypeError) as e:
            raise InvalidRequestError(f"{path}: {e}") from None
