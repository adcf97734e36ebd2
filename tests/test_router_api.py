"""The OpenAI-compatible HTTP API (router.app) on a real uvicorn, over a real colocated decode
server running the tiny model, driven by the official openai client and by raw HTTP. Tenants'
keys and limits: test_router_tenants.py; hostile input: test_router_hostile.py."""

from __future__ import annotations

from collections import Counter

import httpx2
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.decode import DecodeServer
from services.engine.engine import LLMEngine
from services.engine.sampling_params import SamplingParams
from tests.kv_helpers import wait_for
from tests.replica_helpers import decode_server
from tests.router_helpers import KEY, engine, in_use, router_stack, wait_released

AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name three rivers."},
]


@pytest.fixture(scope="module")
def stack(tiny_model_dir):
    with router_stack(tiny_model_dir) as s:
        yield s


@pytest.fixture(scope="module")
def ref(tiny_model_dir) -> LLMEngine:
    """The engine on its own: what greedy output must be."""
    return engine(tiny_model_dir)


def ended(server: DecodeServer) -> Counter[str]:
    """Requests that ended on a server, by status (its own metrics registry)."""
    out: Counter[str] = Counter()
    for fam in server.metrics.registry.collect():
        for s in fam.samples:
            if s.name == "splitserve:requests_total":
                out[s.labels["status"]] += int(s.value)
    return out


@pytest.fixture(autouse=True)
def no_leaks(request):
    yield
    wait_released(request)


def greedy(ref: LLMEngine, prompt_ids: list[int], n: int) -> str:
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    return ref.generate([prompt_ids], params)[0].text


def test_completion_greedy_equals_engine_streaming_or_not(stack, ref):
    prompt = "The quick brown fox"
    ids = stack.tok.encode(prompt)
    want = greedy(ref, ids, 20)
    c = stack.client
    r = c.completions.create(
        model="tiny", prompt=prompt, max_tokens=20, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == "tiny"
    assert [(ch.index, ch.text, ch.finish_reason) for ch in r.choices] == [(0, want, "length")]
    u = r.usage
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (len(ids), 20, len(ids) + 20)
    # The same prompt as token ids.
    r2 = c.completions.create(
        model="tiny", prompt=ids, max_tokens=20, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r2.choices[0].text == want

    chunks = list(
        c.completions.create(
            model="tiny", prompt=prompt, max_tokens=20, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )
    )  # fmt: skip
    *body, last = chunks
    assert "".join(ch.choices[0].text for ch in body) == want
    assert [ch.choices[0].finish_reason for ch in body][-1] == "length"
    assert all(ch.choices[0].finish_reason is None for ch in body[:-1])
    assert all(ch.usage is None and ch.id == chunks[0].id for ch in body)
    assert last.choices == [] and last.usage.completion_tokens == 20
    assert last.usage.prompt_tokens == len(ids)


def test_chat_greedy_equals_engine_streaming_or_not(stack, ref):
    ids = stack.tok.apply_chat_template(CHAT)  # the template with the generation prompt
    want = greedy(ref, ids, 16)
    c = stack.client
    r = c.chat.completions.create(
        model="tiny", messages=CHAT, max_completion_tokens=16, temperature=0,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    msg = r.choices[0].message
    assert (msg.role, msg.content, r.choices[0].finish_reason) == ("assistant", want, "length")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 16)

    chunks = list(
        c.chat.completions.create(
            model="tiny", messages=CHAT, max_tokens=16, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )
    )  # fmt: skip
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == want
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == len(ids) + 16


def test_unset_sampling_takes_the_models_defaults_over_http_and_grpc(stack, ref):
    """tiny-capped's defaults are greedy and 7 tokens: a chat naming neither gets exactly the
    engine's greedy 7 tokens, over HTTP and gRPC; what a request names still wins."""
    import grpc

    from protos.splitserve.v1 import generate_pb2 as gpb
    from protos.splitserve.v1 import generate_pb2_grpc as gpb_grpc

    ids = stack.tok.apply_chat_template(CHAT)
    expect = greedy(ref, ids, 7)
    c = stack.client
    r = c.chat.completions.create(model="tiny-capped", messages=CHAT,
                                  extra_body={"ignore_eos": True})  # fmt: skip
    assert (r.choices[0].message.content, r.usage.completion_tokens) == (expect, 7)
    assert r.choices[0].finish_reason == "length"
    r = c.chat.completions.create(model="tiny-capped", messages=CHAT, max_tokens=3,
                                  extra_body={"ignore_eos": True})  # fmt: skip
    assert r.usage.completion_tokens == 3 and r.choices[0].message.content == greedy(ref, ids, 3)
    with grpc.insecure_channel(stack.grpc) as ch:
        req = gpb.GenerateRequest(model="tiny-capped", prompt_token_ids=gpb.TokenIds(ids=ids))
        req.sampling.ignore_eos = True
        msgs = list(gpb_grpc.GenerateStub(ch).Generate(
            req, metadata=[("authorization", f"Bearer {KEY}")], timeout=60))  # fmt: skip
    assert "".join(m.text for m in msgs) == expect
    assert msgs[-1].usage.completion_tokens == 7


def test_n_samples_use_seed_plus_index(stack):
    c = stack.client
    kw = {"model": "tiny", "prompt": "Once upon", "max_tokens": 8, "temperature": 1.0}
    r = c.completions.create(n=3, seed=7, **kw)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    singles = [c.completions.create(seed=7 + i, **kw).choices[0].text for i in range(3)]
    assert [ch.text for ch in r.choices] == singles
    assert r.usage.completion_tokens == sum(
        c.completions.create(seed=7 + i, **kw).usage.completion_tokens for i in range(3)
    )
    # Streaming, chat: n interleaved choices, each whole.
    chunks = list(
        c.chat.completions.create(
            model="tiny", messages=CHAT, max_tokens=6, temperature=1.0, seed=11, n=2, stream=True
        )
    )
    texts = ["", ""]
    for ch in chunks:
        texts[ch.choices[0].index] += ch.choices[0].delta.content or ""
    one = c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=6, seed=12)
    assert texts[1] == one.choices[0].message.content


def test_batch_prompts(stack, ref):
    c = stack.client
    prompts = ["Red sky at night", "A stitch in time"]
    r = c.completions.create(
        model="tiny", prompt=prompts, n=2, max_tokens=6, temperature=0,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    ids = [stack.tok.encode(p) for p in prompts]
    want = [greedy(ref, x, 6) for x in ids]
    # Choice index = prompt index * n + sample index.
    assert [(ch.index, ch.text) for ch in r.choices] == [
        (0, want[0]), (1, want[0]), (2, want[1]), (3, want[1])
    ]  # fmt: skip
    assert r.usage.prompt_tokens == len(ids[0]) + len(ids[1])
    assert r.usage.completion_tokens == 24


def test_stop_strings_cut_the_text(stack, ref):
    prompt = "Water flows"
    full = greedy(ref, stack.tok.encode(prompt), 24)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    want = full[: full.index(stop)]
    c = stack.client
    for s in (stop, [stop, "\x00never"]):
        r = c.completions.create(
            model="tiny", prompt=prompt, max_tokens=24, temperature=0, stop=s,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        assert (r.choices[0].text, r.choices[0].finish_reason) == (want, "stop")
    chunks = list(
        c.completions.create(
            model="tiny", prompt=prompt, max_tokens=24, temperature=0, stop=stop, stream=True,
            extra_body={"ignore_eos": True},
        )
    )  # fmt: skip
    assert "".join(ch.choices[0].text for ch in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_logprobs(stack):
    c = stack.client
    r = c.completions.create(model="tiny", prompt="Snow falls", max_tokens=6, temperature=0,
                             logprobs=2, extra_body={"ignore_eos": True})  # fmt: skip
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    for t, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert chosen <= 0 and top[t] == chosen and 2 <= len(top) <= 3
        assert chosen == pytest.approx(max(top.values()))  # greedy takes the likeliest
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]

    r = c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=5, temperature=0,
                                  logprobs=True, top_logprobs=3,
                                  extra_body={"ignore_eos": True})  # fmt: skip
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    for e in content:
        if "\ufffd" not in e.token:  # a whole-character token: its text is its bytes
            assert e.bytes == list(e.token.encode())
        assert len(e.top_logprobs) == 3
        assert e.logprob == pytest.approx(e.top_logprobs[0].logprob)
    # The tokens' bytes, joined, are the message (a partial UTF-8 token's text is U+FFFD).
    joined = bytes(b for e in content for b in e.bytes)
    assert joined.decode("utf-8", errors="replace") == r.choices[0].message.content
    # Streaming: each chunk carries the logprobs of its own tokens.
    chunks = list(
        c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=5, temperature=0,
                                  logprobs=True, stream=True, extra_body={"ignore_eos": True})
    )  # fmt: skip
    streamed = [e.token for ch in chunks if ch.choices and ch.choices[0].logprobs
                for e in ch.choices[0].logprobs.content]  # fmt: skip
    assert streamed == [e.token for e in content]


def test_models_health_and_metrics(stack):
    models = stack.client.models.list()
    assert {m.id for m in models.data} == {"tiny", "busy", "down", "flaky", "tiny-capped"}
    assert httpx2.get(f"{stack.url}/health").json() == {"status": "ok"}

    def count(**labels) -> float:
        text = httpx2.get(f"{stack.url}/metrics").text
        fams = {f.name: f for f in text_string_to_metric_families(text)}
        return sum(
            s.value
            for s in fams["splitserve:router_requests"].samples
            if s.name.endswith("_total") and labels.items() <= s.labels.items()
        )

    ok = {"endpoint": "completion", "model": "tiny", "tenant": "main", "status": "200"}
    unknown = {"endpoint": "chat", "model": "", "tenant": "main", "status": "404"}
    before = count(**ok), count(**unknown)
    stack.client.completions.create(model="tiny", prompt="hi", max_tokens=2)
    with pytest.raises(openai.NotFoundError):  # a model name a client made up is no label
        stack.client.chat.completions.create(model="made-up", messages=CHAT, max_tokens=2)
    assert (count(**ok), count(**unknown)) == (before[0] + 1, before[1] + 1)


# -- auth and limits ---------------------------------------------------------------------------


def test_replica_lost_mid_stream_ends_the_stream_with_an_error_event(stack, tiny_model_dir):
    flaky = decode_server(tiny_model_dir, engine={"num_kv_blocks": 256}, colocated=True)
    stack.lt.run(flaky.start())
    stack.backend.set_address("flaky", flaky.address)
    stream = stack.client.completions.create(
        model="flaky", prompt="Go on", max_tokens=1500, stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    got = 0
    with pytest.raises(openai.APIError) as ei:
        for _ in stream:
            got += 1
            if got == 5:  # the replica goes away, its stream with it
                stack.lt.run(flaky.app.stop(grace=0))
    assert 5 <= got < 1500 and ei.value.message

    def idle() -> bool:
        return not stack.lt.run(flaky.loop.call(lambda e: e.has_unfinished()))

    # The replica aborted the request when its stream went (counted: it never reached 1500).
    wait_for(lambda: idle() and ended(flaky), timeout=60)
    assert ended(flaky) == Counter(cancelled=1)
    assert stack.lt.run(flaky.loop.call(lambda e: e.check_integrity())).in_use == 0
    flaky.loop.stop()
    assert stack.client.completions.create(model="tiny", prompt="hi", max_tokens=2).choices


# -- disconnects -------------------------------------------------------------------------------


def test_disconnect_mid_stream_aborts_and_frees_blocks(stack):
    body = {"model": "tiny", "prompt": "Tell me everything", "max_tokens": 1900,
            "ignore_eos": True}  # fmt: skip
    # Proved by what the server counts, not by how soon the pool empties (a busy machine is
    # slow at both): each request ends as cancelled, none runs to its length.
    url = f"{stack.url}/v1/completions"
    before = ended(stack.server)
    with (
        httpx2.Client(timeout=30) as h,
        h.stream("POST", url, json={**body, "stream": True}, headers=AUTH) as r,
    ):
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        assert in_use(stack) > 0
    wait_for(lambda: in_use(stack) == 0 and ended(stack.server) != before, timeout=60)
    assert ended(stack.server) - before == Counter(cancelled=1)
    # A non-streaming request whose client gives up is aborted too.
    with pytest.raises(httpx2.ReadTimeout):
        httpx2.post(f"{stack.url}/v1/completions", json=body, headers=AUTH, timeout=0.5)
    wait_for(
        lambda: in_use(stack) == 0 and ended(stack.server) - before != Counter(cancelled=1), 60
    )
    assert ended(stack.server) - before == Counter(cancelled=2)
    assert not stack.lt.run(stack.server.loop.call(lambda e: e.has_unfinished()))
