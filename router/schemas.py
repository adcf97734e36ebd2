"""Request bodies of the OpenAI API, validated at the edge (pydantic, strict types).

Strict: `"max_tokens": "5"` or `5.0` is a type error, as it is for OpenAI. Unknown arguments
are refused ("Unrecognized request argument supplied"), as OpenAI does; OpenAI arguments this
server does not implement are accepted at their neutral value and refused otherwise (see
`unsupported_fields`), so a typo never silently changes what runs. Bounds here are the wire's
(uint32 token ids, int64 seeds); the engine's SamplingParams checks the rest.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator

U31 = 2**31 - 1  # token ids and counts travel as uint32/int32
I63 = 2**63 - 1  # seeds travel as int64

TokenId = Annotated[int, Field(ge=0, le=U31)]
_TOKEN_ID_SCHEMA = {"type": "integer", "minimum": 0, "maximum": U31}
# What `prompt` takes, for the OpenAPI document (CompletionRequest._prompt checks it by hand).
_PROMPT_SCHEMA = {
    "oneOf": [
        {"type": "string"},
        {"type": "array", "minItems": 1, "items": {"type": "string"}},
        {"type": "array", "minItems": 1, "items": _TOKEN_ID_SCHEMA},
        {"type": "array", "minItems": 1,
         "items": {"type": "array", "minItems": 1, "items": _TOKEN_ID_SCHEMA}},
    ]
}  # fmt: skip

# What a union-typed field should be, for one clear type error (errors.from_validation).
DESCRIPTIONS = {
    "prompt": "a string, an array of strings, an array of token ids or an array of arrays "
    "of token ids",
    "stop": "a string or an array of strings",
    "content": "a string or an array of content parts",
    "tool_choice": "a string or an object",
}
# For the OpenAPI document; vLLM's field, placed where vLLM places it.
_RETURN_TOKEN_IDS = (
    "true: each choice carries `token_ids`, the ids of its generated tokens (in a stream, each "
    "chunk's own, and a chunk comes for every token, text or not), and `prompt_token_ids` "
    "comes too (completions: in each choice; chat: at the top level; in a stream, in the first "
    "chunk of each choice or of the response)"
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Common(_Strict):
    """Arguments both endpoints take."""

    model: str = Field(min_length=1, max_length=512)
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | Annotated[list[str], Field(max_length=16)] | None = None
    max_tokens: int | None = Field(None, ge=1, le=U31)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(2**63), le=I63)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = Field(None, max_length=512)
    # Extensions (vLLM's names).
    top_k: int | None = Field(None, ge=-1, le=U31)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=100.0)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0, le=U31)
    stop_token_ids: list[TokenId] | None = Field(None, max_length=256)
    skip_special_tokens: bool = True
    # Engine priority, 0 first, within the router's priority_levels (router.tenants).
    priority: int | None = Field(None, ge=0, le=255)
    # A streamed token may have no text of its own (part of a UTF-8 character, a special
    # token; often, with random weights): only its id shows that it came.
    return_token_ids: bool = Field(False, description=_RETURN_TOKEN_IDS)

    @property
    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def unsupported_fields(self) -> list[tuple[str, str]]:
        """(argument, why) for OpenAI arguments given a value this server cannot honour."""
        out = []
        if self.logit_bias:
            out.append(("logit_bias", ""))
        return out


class CompletionRequest(_Common):
    prompt: Annotated[Any, WithJsonSchema(_PROMPT_SCHEMA)] = Field(
        description=DESCRIPTIONS["prompt"]
    )
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=128)
    suffix: str | None = None

    @field_validator("prompt", mode="plain")
    @classmethod
    def _prompt(cls, v: Any) -> str | list[str] | list[int] | list[list[int]]:
        """Checked by hand: a four-way union's per-member errors say nothing useful."""
        if isinstance(v, str):
            return v
        if not isinstance(v, list) or not v:
            raise ValueError(f"expected {DESCRIPTIONS['prompt']} (not empty)")
        if all(isinstance(x, str) for x in v):
            return v
        if all(_is_token_id(x) for x in v):
            return v
        if all(isinstance(x, list) and x and all(_is_token_id(t) for t in x) for x in v):
            return v
        raise ValueError(
            f"expected {DESCRIPTIONS['prompt']}; token ids are integers in [0, {U31}] and "
            "no array may be empty"
        )

    def unsupported_fields(self) -> list[tuple[str, str]]:
        out = super().unsupported_fields()
        if self.echo:
            out.append(("echo", " = true"))
        if self.suffix:
            out.append(("suffix", ""))
        if self.best_of is not None and self.best_of != self.n:
            out.append(("best_of", " other than n"))
        return out


def _is_token_id(x: Any) -> bool:
    return type(x) is int and 0 <= x <= U31


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    # Extra keys are ignored: clients send back the assistant message they were given, with
    # null fields (refusal, tool_calls, annotations, ...) this server never sets.
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = Field(None, description=DESCRIPTIONS["content"])
    name: str | None = Field(None, max_length=256)

    def text(self) -> str:
        """The content as one string; only text parts are supported."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text or "" for p in self.content)

    def non_text_part(self) -> int | None:
        if isinstance(self.content, list):
            for i, p in enumerate(self.content):
                if p.type != "text" or p.text is None:
                    return i
        return None


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1, max_length=4096)
    max_completion_tokens: int | None = Field(None, ge=1, le=U31)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    # OpenAI arguments without an implementation here: neutral values only.
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    # Accepted and ignored: they change billing, storage or tracing, not the tokens.
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None

    def unsupported_fields(self) -> list[tuple[str, str]]:
        out = super().unsupported_fields()
        if self.tools:
            out.append(("tools", ""))
        if self.functions:
            out.append(("functions", ""))
        if self.tool_choice not in (None, "none", "auto"):
            out.append(("tool_choice", f" = {self.tool_choice!r}"))
        if self.function_call not in (None, "none", "auto"):
            out.append(("function_call", ""))
        if self.response_format not in (None, {"type": "text"}):
            out.append(("response_format", " other than {'type': 'text'}"))
        if self.modalities not in (None, ["text"]):
            out.append(("modalities", " other than ['text']"))
        if self.audio is not None:
            out.append(("audio", ""))
        if self.prediction is not None:
            out.append(("prediction", ""))
        return out


def _field_names(*models: type[BaseModel]) -> frozenset[str]:
    return frozenset(f for m in models for f in m.model_fields)


# Every argument name, to tell fields from union member tags in pydantic's error locations.
FIELD_NAMES = _field_names(
    CompletionRequest, ChatCompletionRequest, ChatMessage, ContentPart, StreamOptions
)
