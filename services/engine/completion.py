"""A finished request as `LLMEngine.generate` returns it, gathered from its step outputs."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.engine.kv_transfer import KVBlock
from services.engine.request import FinishReason, RequestOutput
from services.engine.sampler import SampledToken


@dataclass
class Completion:
    """A finished request, gathered from its step outputs."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason | None = None
    logprobs: list[SampledToken] = field(default_factory=list)
    num_cached_tokens: int = 0
    kv_blocks: list[KVBlock] | None = None

    def add(self, out: RequestOutput) -> None:
        self.token_ids += out.new_token_ids
        self.text += out.new_text
        self.logprobs += out.logprobs
        if out.finished:
            self.finish_reason = out.finish_reason
            self.num_cached_tokens = out.num_cached_tokens
            self.kv_blocks = out.kv_blocks
