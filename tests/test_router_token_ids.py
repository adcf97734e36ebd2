"""`return_token_ids` (vLLM's field) on the OpenAI API: off, the responses are byte for byte
what they were; on, every generated token's id comes back (in a stream, a chunk for each piece
of tokens even when it has no text), with the prompt's ids where vLLM puts them. Over a real
colocated server running the tiny model (random weights: many of its tokens have no text of
their own), driven by raw HTTP; and the load generator's HTTP client counting tokens by id."""

from __future__ import annotations

import asyncio
import json

import httpx2
import pytest

from loadgen.http_client import HttpClient
from loadgen.prompts import Prompt
from loadgen.replay import replay
from loadgen.workload import Planned
from protos.splitserve.v1 import common_pb2 as cpb
from router.openai_api import Plan, Shaper, Sub
from rpc.piece import Piece
from services.engine.sampling_params import SamplingParams
from tests.router_helpers import (
    KEY,
    assert_error_shape,
    engine,
    router_stack,
    wait_released,
)

AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = [{"role": "user", "content": "Name three rivers."}]
# Greedy from these ids, the tiny model repeats one byte token that is no UTF-8 on its own: its
# text all comes with the last piece, so a text-only stream has one chunk for 12 tokens.
IDS = list(range(100, 108))
N = 12
BASE = {"max_tokens": N, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def stack(tiny_model_dir):
    with router_stack(tiny_model_dir, broken_models=False) as s:
        yield s


@pytest.fixture(autouse=True)
def no_leaks(request):
    yield
    wait_released(request)


def post(stack, path: str, body: dict) -> httpx2.Response:
    return httpx2.post(f"{stack.url}/v1/{path}", json=body, headers=AUTH, timeout=60)


def events(r: httpx2.Response) -> list[dict]:
    assert r.status_code == 200, r.text
    raw = [e for e in r.text.split("\n\n") if e]
    assert raw[-1] == "data: [DONE]"
    return [json.loads(e.removeprefix("data: ")) for e in raw[:-1]]


def anonymous(obj: dict) -> dict:
    """The response without what differs between two identical requests."""
    return {k: v for k, v in obj.items() if k not in ("id", "created")}


# -- off: unchanged ------------------------------------------------------------------------


def test_off_the_shaper_writes_the_same_bytes():
    """The hand-built SSE bytes with the flag off, pinned: a token without text makes no chunk."""
    params = SamplingParams(max_tokens=3)
    for kind, head, text, empty in (
        ("completion", "text_completion", '"text":"a"', '"text":""'),
        ("chat", "chat.completion.chunk", '"delta":{"content":"a"}', '"delta":{}'),
    ):
        p = Plan(kind, "x", 1, "m", [Sub(0, 0, [1, 2, 3], params)], True, False, None)
        sh = Shaper(p, None)
        out = sh.role_chunks()
        usage = cpb.Usage(completion_tokens=3)
        for piece in (Piece([7], "a"), Piece([8], ""), Piece([9], "", [], "length", usage)):
            out += sh.chunk(0, piece) or b""
        pre = f'data: {{"id":"x","object":"{head}","created":1,"model":"m","choices":[{{"index":0,'
        role = '"delta":{"role":"assistant","content":""}' if kind == "chat" else None
        want = "".join(
            f'{pre}{delta},"logprobs":null,"finish_reason":{f}}}]}}\n\n'
            for delta, f in ((role, "null"), (text, "null"), (empty, '"length"'))
            if delta is not None
        )
        assert out.decode() == want


def test_off_or_false_gives_the_same_responses(stack):
    for path, prompt in (
        ("completions", {"prompt": IDS}),
        ("chat/completions", {"messages": CHAT}),
    ):
        for stream in (False, True):
            body = {"model": "tiny", **prompt, **BASE, "stream": stream}
            a, b = post(stack, path, body), post(stack, path, {**body, "return_token_ids": False})
            if stream:
                got = [[anonymous(e) for e in events(r)] for r in (a, b)]
            else:
                got = [anonymous(r.json()) for r in (a, b)]
            assert got[0] == got[1]
            assert "token_ids" not in a.text and "token_ids" not in b.text
    # This prompt's text comes whole at the end: one chunk for its 12 tokens.
    off = events(post(stack, "completions", {"model": "tiny", "prompt": IDS, **BASE,
                                             "stream": True}))  # fmt: skip
    assert len(off) == 1 and off[0]["choices"][0]["finish_reason"] == "length"


# -- on ------------------------------------------------------------------------------------


def test_completion_ids_streamed_or_not_equal_the_engines(stack, tiny_model_dir):
    ref = engine(tiny_model_dir)
    [out] = ref.generate([IDS], SamplingParams(max_tokens=N, temperature=0.0, ignore_eos=True))
    body = {"model": "tiny", "prompt": IDS, **BASE, "return_token_ids": True}
    whole = post(stack, "completions", body).json()
    [ch] = whole["choices"]
    assert ch["token_ids"] == list(out.token_ids) and ch["prompt_token_ids"] == IDS
    assert len(ch["token_ids"]) == whole["usage"]["completion_tokens"] == N
    assert "prompt_token_ids" not in whole

    *chunks, last = events(post(stack, "completions", {
        **body, "stream": True, "stream_options": {"include_usage": True}}))  # fmt: skip
    per = [c["choices"][0]["token_ids"] for c in chunks]
    assert [len(x) for x in per] == [1] * N  # a chunk for every token, text or none
    assert [t for x in per for t in x] == ch["token_ids"]
    assert last["usage"]["completion_tokens"] == N
    assert "".join(c["choices"][0]["text"] for c in chunks) == ch["text"]
    assert chunks[0]["choices"][0]["prompt_token_ids"] == IDS  # vLLM's place: the first chunk
    assert not any("prompt_token_ids" in c["choices"][0] for c in chunks[1:])

    # A batch: each choice with its own prompt's ids.
    other = [5, 6, 7]
    r = post(stack, "completions", {**body, "prompt": [IDS, other], "max_tokens": 3}).json()
    assert [c["prompt_token_ids"] for c in r["choices"]] == [IDS, other]
    assert sum(len(c["token_ids"]) for c in r["choices"]) == r["usage"]["completion_tokens"] == 6


def test_chat_ids_streamed_or_not(stack):
    prompt_ids = stack.tok.apply_chat_template(CHAT)
    body = {"model": "tiny", "messages": CHAT, **BASE, "return_token_ids": True}
    whole = post(stack, "chat/completions", body).json()
    [ch] = whole["choices"]
    assert whole["prompt_token_ids"] == prompt_ids  # vLLM's place for a chat: the top level
    assert len(ch["token_ids"]) == whole["usage"]["completion_tokens"] == N
    assert "prompt_token_ids" not in ch

    role, *chunks, last = events(post(stack, "chat/completions", {
        **body, "stream": True, "stream_options": {"include_usage": True}}))  # fmt: skip
    assert role["choices"][0]["delta"]["role"] == "assistant"
    assert role["choices"][0]["token_ids"] == [] and role["prompt_token_ids"] == prompt_ids
    assert not any("prompt_token_ids" in c for c in chunks)
    streamed = [t for c in chunks for t in c["choices"][0]["token_ids"]]
    assert streamed == ch["token_ids"] and last["usage"]["completion_tokens"] == N
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == ch["message"]["content"]


@pytest.mark.parametrize("path", ["completions", "chat/completions"])
def test_a_value_not_boolean_is_a_400_naming_it(stack, path):
    prompt = {"prompt": IDS} if path == "completions" else {"messages": CHAT}
    for v in ("true", 1, 0, None, [], {}):
        r = post(stack, path, {"model": "tiny", **prompt, "max_tokens": 2, "return_token_ids": v})
        err = assert_error_shape(r)
        assert r.status_code == 400 and err["param"] == "return_token_ids"
        assert err["message"] == (
            "Invalid type for 'return_token_ids': Input should be a valid boolean."
        ), err


# -- the load generator --------------------------------------------------------------------


def test_loadgen_http_client_counts_tokens_by_id(stack):
    """Token-id prompts ask for ids: each token is a timed piece though its text comes last."""
    client = HttpClient(f"{stack.url}/v1", "tiny", timeout_s=60, extra_body={"temperature": 0})
    p = Planned(0, 0.0, Prompt(ids=tuple(IDS), num_tokens=len(IDS)), N, "main", KEY, False)
    assert json.loads(client.body(p))["return_token_ids"] is True
    text = Planned(1, 0.0, Prompt(parts=("hi",), num_tokens=1), N, "main", KEY, False)
    assert "return_token_ids" not in json.loads(client.body(text))
    [o] = asyncio.run(replay([p], client, 1)).outcomes
    assert o.ok, o.error
    assert len(o.chunk_times) == o.output_tokens == N and o.prompt_tokens == len(IDS)
    assert o.first_token == o.chunk_times[0] < o.chunk_times[-1] <= o.end
