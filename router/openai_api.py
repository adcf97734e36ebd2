"""The OpenAI API in our terms: a request body becomes a Plan (model, prompt token ids and
sampling parameters per choice), and the backend's Pieces become OpenAI response objects.

Streaming chunks are built as strings around a prefix fixed per request, with json.dumps only
for the new text: no pydantic and no tokenizer on the per-token path (token texts for logprobs
come from a per-model cache).
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from pydantic import ValidationError

from router.errors import APIError, bad_request, from_validation, unsupported
from router.schemas import (
    DESCRIPTIONS,
    FIELD_NAMES,
    I63,
    ChatCompletionRequest,
    CompletionRequest,
)
from rpc.piece import Piece
from services.engine.errors import ModelLoadError
from services.engine.sampling_params import SamplingDefaults, SamplingParams
from services.engine.tokenizer import Tokenizer

Kind = Literal["completion", "chat"]

MAX_SEQUENCES = 256  # prompts x n in one request
# OpenAI's for completions; a chat that names none gets the model's cap (SamplingDefaults),
# at most the rest of the context.
DEFAULT_COMPLETION_MAX_TOKENS = 16


@dataclass(frozen=True)
class Sub:
    """One sequence to generate: one choice of the response."""

    index: int  # the choice index
    prompt: int  # which prompt of a batch
    prompt_ids: list[int]
    params: SamplingParams


@dataclass(frozen=True)
class Plan:
    kind: Kind
    request_id: str
    created: int
    model: str
    subs: list[Sub]
    stream: bool
    include_usage: bool
    logprobs: int | None  # API-level: how many top alternatives to show; None: no logprobs
    priority: int | None = None  # the request's own; None: fair admission picks
    token_ids: bool = False  # return_token_ids: generated and prompt token ids in the response

    @property
    def prompt_tokens(self) -> int:
        seen: dict[int, int] = {}
        for s in self.subs:
            seen.setdefault(s.prompt, len(s.prompt_ids))
        return sum(seen.values())


def parse(kind: Kind, body: bytes) -> CompletionRequest | ChatCompletionRequest:
    cls = CompletionRequest if kind == "completion" else ChatCompletionRequest
    try:
        req = cls.model_validate_json(body)
    except ValidationError as e:
        raise from_validation(e, FIELD_NAMES, DESCRIPTIONS) from None
    refused = req.unsupported_fields()
    if refused:
        raise unsupported(*refused[0])
    batch = num_prompts(req)
    if batch * req.n > MAX_SEQUENCES:  # checked before anything is tokenized
        raise bad_request(
            f"{batch} prompts x n={req.n} is more than {MAX_SEQUENCES} sequences in one request",
            "n",
        )
    if req.stream_options is not None and not req.stream:
        raise bad_request(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            "stream_options",
        )
    return req


def prompts_of(req: CompletionRequest | ChatCompletionRequest, tok: Tokenizer) -> list[list[int]]:
    """Token ids of each prompt (the chat template applied for chat). May take milliseconds for
    long texts: callers run it off the event loop then."""
    if isinstance(req, ChatCompletionRequest):
        msgs = []
        for i, m in enumerate(req.messages):
            j = m.non_text_part()
            if j is not None:
                raise unsupported(f"messages[{i}].content[{j}]", " (a non-text content part)")
            role = "system" if m.role == "developer" else m.role
            msg = {"role": role, "content": m.text()}
            if m.name:
                msg["name"] = m.name
            msgs.append(msg)
        try:
            return [tok.apply_chat_template(msgs)]
        except ModelLoadError as e:  # no template, or the template refused these messages
            raise bad_request(str(e), "messages") from None
    p = req.prompt
    if isinstance(p, str):
        return [tok.encode(p)]
    if isinstance(p[0], str):
        return [tok.encode(x) for x in p]
    if isinstance(p[0], int):
        return [p]
    return p


def num_prompts(req: CompletionRequest | ChatCompletionRequest) -> int:
    if isinstance(req, ChatCompletionRequest) or isinstance(req.prompt, str):
        return 1
    return 1 if isinstance(req.prompt[0], int) else len(req.prompt)


def text_length(req: CompletionRequest | ChatCompletionRequest) -> int:
    if isinstance(req, ChatCompletionRequest):
        return sum(len(m.text()) for m in req.messages)
    p = req.prompt
    return len(p) if isinstance(p, str) else sum(len(x) for x in p if isinstance(x, str))


def plan(
    kind: Kind,
    req: CompletionRequest | ChatCompletionRequest,
    prompts: list[list[int]],
    max_model_len: int,
    defaults: SamplingDefaults | None = None,
) -> Plan:
    """Check lengths and sampling values against the model; one Sub per (prompt, sample).
    defaults: the model's sampling for what the request leaves unset."""
    defaults = defaults or SamplingDefaults()
    param = "messages" if kind == "chat" else "prompt"
    if isinstance(req, ChatCompletionRequest):
        if req.max_completion_tokens is not None:
            max_tokens, mt_param = req.max_completion_tokens, "max_completion_tokens"
        else:
            max_tokens, mt_param = req.max_tokens, "max_tokens"
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request("'top_logprobs' requires 'logprobs' to be true.", "top_logprobs")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        lp_param = "top_logprobs"
    else:
        max_tokens, mt_param = req.max_tokens or DEFAULT_COMPLETION_MAX_TOKENS, "max_tokens"
        logprobs, lp_param = req.logprobs, "logprobs"
    if req.seed is not None and req.seed + req.n - 1 > I63:
        raise bad_request(f"seed + n - 1 must fit in 64 bits (at most {I63})", "seed")
    subs = []
    for pi, ids in enumerate(prompts):
        if not ids:
            raise bad_request("The prompt is empty: it encodes to no tokens.", param)
        if len(ids) >= max_model_len:
            raise _too_long(max_model_len, len(ids), 1, param)
        if max_tokens is not None:
            want = max_tokens
        else:
            want = min(defaults.max_tokens, max_model_len - len(ids))
        if len(ids) + want > max_model_len:
            raise _too_long(max_model_len, len(ids), want, param)
        base = _sampling(req, want, logprobs, mt_param, lp_param, defaults)
        for i in range(req.n):
            params = base
            if req.seed is not None and i:
                params = dataclasses.replace(base, seed=req.seed + i)
            subs.append(Sub(pi * req.n + i, pi, ids, params))
    prefix = "chatcmpl" if kind == "chat" else "cmpl"
    return Plan(
        kind=kind,
        request_id=f"{prefix}-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=req.model,
        subs=subs,
        stream=req.stream,
        include_usage=req.include_usage,
        logprobs=logprobs,
        priority=req.priority,
        token_ids=req.return_token_ids,
    )


def _too_long(limit: int, prompt: int, completion: int, param: str) -> APIError:
    return bad_request(
        f"This model's maximum context length is {limit} tokens. However, you requested "
        f"{prompt + completion} tokens ({prompt} in the {param}, {completion} in the "
        "completion). Please reduce the length of the prompt or the completion.",
        param,
        "context_length_exceeded",
    )


_OPTIONAL = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
)


def _sampling(
    req: CompletionRequest | ChatCompletionRequest,
    max_tokens: int,
    logprobs: int | None,
    mt_param: str,
    lp_param: str,
    defaults: SamplingDefaults,
) -> SamplingParams:
    kw: dict = {
        **defaults.fields(),
        "max_tokens": max_tokens,
        "stop": req.stop_list,
        "ignore_eos": req.ignore_eos,
        "min_tokens": req.min_tokens,
        "skip_special_tokens": req.skip_special_tokens,
        "logprobs": logprobs,
        "seed": req.seed,
    }
    if req.stop_token_ids:
        kw["stop_token_ids"] = tuple(req.stop_token_ids)
    for name in _OPTIONAL:
        v = getattr(req, name)
        if v is not None:
            kw[name] = v
    try:
        return SamplingParams(**kw)
    except ValueError as e:  # the engine's own checks (InvalidRequestError)
        msg = str(e)
        first = msg.split(" ", 1)[0]
        names = {"max_tokens": mt_param, "logprobs": lp_param, "stop": "stop"}
        param = names.get(first, first if first in kw else None)
        raise bad_request(msg, param, "invalid_value") from None


# -- responses ---------------------------------------------------------------------------------


class TokenTexts:
    """Token id -> its text and its exact bytes, for logprobs. Cached: a vocabulary's worth of
    entries at most."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        self._cache: dict[int, str] = {}
        self._bytes: dict[int, list[int]] = {}

    def __call__(self, token_id: int) -> str:
        s = self._cache.get(token_id)
        if s is None:
            s = self._cache[token_id] = self.tok.decode([token_id], skip_special_tokens=False)
        return s

    def bytes_of(self, token_id: int) -> list[int]:
        """What the token stands for, byte for byte: a token holding part of a UTF-8
        character has text U+FFFD but its own bytes."""
        b = self._bytes.get(token_id)
        if b is None:
            b = self._bytes[token_id] = list(self.tok.token_bytes(token_id))
        return b


@dataclass
class ChoiceState:
    """What one choice has produced so far."""

    texts: list[str] = field(default_factory=list)
    logprobs: list = field(default_factory=list)  # cpb.TokenLogprob
    token_ids: list[int] = field(default_factory=list)
    num_tokens: int = 0
    cached_tokens: int = 0
    finish_reason: str | None = None
    text_offset: int = 0  # completions' logprobs.text_offset, for streaming
    prompt_ids_sent: bool = False  # a completions stream sends them once per choice

    def add(self, piece: Piece) -> None:
        self.texts.append(piece.text)
        self.logprobs += piece.logprobs
        self.token_ids += piece.token_ids
        self.update(piece)

    def update(self, piece: Piece) -> None:
        """Counts only (streaming keeps no text)."""
        self.num_tokens += len(piece.token_ids)
        if piece.finish_reason:
            self.finish_reason = piece.finish_reason
            if piece.usage is not None:
                self.num_tokens = piece.usage.completion_tokens
                self.cached_tokens = piece.usage.cached_tokens


def _dumps(obj) -> str:
    return json.dumps(obj, separators=(",", ":"))


class Shaper:
    """OpenAI objects for one request: streamed chunks (bytes, SSE-framed) and whole
    responses (dicts)."""

    def __init__(self, plan: Plan, token_text: TokenTexts) -> None:
        self.plan = plan
        self.token_text = token_text
        self.states = [ChoiceState() for _ in plan.subs]
        chat = plan.kind == "chat"
        obj = "chat.completion.chunk" if chat else "text_completion"
        self._head = (
            f'data: {{"id":"{plan.request_id}","object":"{obj}","created":{plan.created},'
            f'"model":{_dumps(plan.model)},"choices":'
        )
        self._usage_tail = ',"usage":null}\n\n' if plan.include_usage else "}\n\n"
        self._text_key = '"delta":{"content":' if chat else '"text":'
        self._text_end = "}" if chat else ""
        self._ids = plan.token_ids

    # -- streaming ------------------------------------------------------------------------

    def role_chunks(self) -> bytes:
        """Chat streams open each choice with the assistant role, as OpenAI does."""
        if self.plan.kind != "chat":
            return b""
        ids = top = ""
        if self._ids:  # vLLM's place for a chat's prompt ids: the stream's first chunk
            ids = ',"token_ids":[]'
            top = f',"prompt_token_ids":{_dumps(self.plan.subs[0].prompt_ids)}'
        return "".join(
            f'{self._head}[{{"index":{s.index},"delta":{{"role":"assistant","content":""}},'
            f'"logprobs":null,"finish_reason":null{ids}}}]{"" if i else top}{self._usage_tail}'
            for i, s in enumerate(self.plan.subs)
        ).encode()

    def chunk(self, k: int, piece: Piece) -> bytes | None:
        """The chunk for sub k's piece; None when there is nothing to say (a piece whose
        bytes don't yet complete a character, unless token ids were asked for)."""
        st = self.states[k]
        st.update(piece)
        fin = piece.finish_reason
        said = piece.text or fin or piece.logprobs or (self._ids and piece.token_ids)
        if not said:
            return None
        lp = "null"
        if self.plan.logprobs is not None and piece.logprobs:
            if self.plan.kind == "chat":
                lp = _dumps(self.chat_logprobs(piece.logprobs))
            else:
                d, st.text_offset = self.completion_logprobs(piece.logprobs, st.text_offset)
                lp = _dumps(d)
        if self.plan.kind == "chat" and not piece.text and fin:
            delta = '"delta":{}'
        else:
            delta = self._text_key + json.dumps(piece.text) + self._text_end
        ids = self._id_fields(k, piece) if self._ids else ""
        return (
            f'{self._head}[{{"index":{self.plan.subs[k].index},{delta},"logprobs":{lp},'
            f'"finish_reason":{_dumps(fin) if fin else "null"}{ids}}}]{self._usage_tail}'
        ).encode()

    def _id_fields(self, k: int, piece: Piece) -> str:
        out = f',"token_ids":[{",".join(map(str, piece.token_ids))}]'  # json.dumps: 4x the time
        st = self.states[k]
        if self.plan.kind == "completion" and not st.prompt_ids_sent:
            st.prompt_ids_sent = True  # vLLM's place: each choice's first chunk
            out += f',"prompt_token_ids":{_dumps(self.plan.subs[k].prompt_ids)}'
        return out

    def usage_chunk(self) -> bytes:
        return f'{self._head}[],"usage":{_dumps(self.usage())}}}\n\n'.encode()

    def error_chunk(self, err: APIError) -> bytes:
        return f"data: {_dumps(err.body())}\n\n".encode()

    # -- whole responses ------------------------------------------------------------------

    def response(self) -> dict:
        choices = []
        for sub, st in zip(self.plan.subs, self.states, strict=True):
            text = "".join(st.texts)
            lp = None
            if self.plan.logprobs is not None:
                if self.plan.kind == "chat":
                    lp = self.chat_logprobs(st.logprobs)
                else:
                    lp = self.completion_logprobs(st.logprobs, 0)[0]
            if self.plan.kind == "chat":
                body = {"message": {"role": "assistant", "content": text}}
            else:
                body = {"text": text}
            choice = {"index": sub.index, **body, "logprobs": lp, "finish_reason": st.finish_reason}
            if self._ids:
                choice["token_ids"] = st.token_ids
                if self.plan.kind == "completion":  # a batch's choices have their own prompts
                    choice["prompt_token_ids"] = sub.prompt_ids
            choices.append(choice)
        out = {
            "id": self.plan.request_id,
            "object": "chat.completion" if self.plan.kind == "chat" else "text_completion",
            "created": self.plan.created,
            "model": self.plan.model,
            "choices": choices,
            "usage": self.usage(),
        }
        if self._ids and self.plan.kind == "chat":
            out["prompt_token_ids"] = self.plan.subs[0].prompt_ids
        return out

    def usage(self) -> dict:
        prompt = self.plan.prompt_tokens
        completion = sum(st.num_tokens for st in self.states)
        first = {}
        for sub, st in zip(self.plan.subs, self.states, strict=True):
            first.setdefault(sub.prompt, st.cached_tokens)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(first.values())},
        }

    # -- logprobs -------------------------------------------------------------------------

    def completion_logprobs(self, lps: Sequence, offset: int) -> tuple[dict, int]:
        """The legacy shape: parallel lists, top alternatives as {token: logprob}."""
        text = self.token_text
        tokens, token_lps, tops, offsets = [], [], [], []
        for lp in lps:
            t = text(lp.token_id)
            tokens.append(t)
            token_lps.append(lp.logprob)
            top = {text(x.token_id): x.logprob for x in lp.top}
            top.setdefault(t, lp.logprob)
            tops.append(top)
            offsets.append(offset)
            offset += len(t)
        d = {
            "tokens": tokens,
            "token_logprobs": token_lps,
            "top_logprobs": tops,
            "text_offset": offsets,
        }
        return d, offset

    def chat_logprobs(self, lps: Sequence) -> dict:
        text = self.token_text

        def entry(token_id: int, logprob: float) -> dict:
            return {"token": text(token_id), "logprob": logprob, "bytes": text.bytes_of(token_id)}

        content = [
            {
                **entry(lp.token_id, lp.logprob),
                "top_logprobs": [entry(x.token_id, x.logprob) for x in lp.top],
            }
            for lp in lps
        ]
        return {"content": content, "refusal": None}
