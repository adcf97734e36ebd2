"""Hostile input to the OpenAI-compatible HTTP API: every malformed, out-of-range or oversized
request gets a 4xx with an OpenAI-style error body naming the argument, never reaches the engine
(but one), and leaves the server healthy."""

from __future__ import annotations

import json
import random

import httpx2
import pytest

from tests.kv_helpers import wait_for
from tests.router_helpers import KEY, assert_error_shape, in_use, router_stack

AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def stack(tiny_model_dir):
    with router_stack(tiny_model_dir) as s:
        yield s


@pytest.fixture(autouse=True)
def no_leaks(stack):
    """After each test, the server's block pool is intact and every block is released."""
    yield
    wait_for(lambda: in_use(stack) == 0, timeout=30)


COMPLETION = {"model": "tiny", "prompt": "hi", "max_tokens": 4}
CHAT_BODY = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}

# (argument, bad values) for both endpoints; each must be a 400 naming the argument.
COMMON_BAD = {
    "model": [1, None, [], {}, True, ""],
    "max_tokens": ["5", 5.5, -1, 0, True, 2**64, [], {}],
    "temperature": ["1", -0.1, 2.5, True, []],
    "top_p": [0, 1.5, "x", -1],
    "n": [0, -1, 1000, "2", 1.5],
    "seed": ["1", 1.5, 2**70, -(2**70)],
    "stop": [1, [1], {}, [""], ["a"] * 17, [None]],
    "stream": ["yes", 1, None],
    "stream_options": ["x", {"include_usage": "yes"}, {"bogus": 1}, {"include_usage": True}],
    "presence_penalty": [3, -3, "0"],
    "frequency_penalty": [3, -2.5],
    "top_k": [-2, "1", 1.5],
    "min_p": [2, -0.1],
    "repetition_penalty": [0, -1, 101],
    "min_tokens": [-1, "1", 5],
    "ignore_eos": ["true", 1],
    "stop_token_ids": [[-1], "1", [1.5], [2**40]],
    "user": [1, [], "x" * 1000],
    "logit_bias": [{"1": 5}, "x", {"1": "a"}],
    "skip_special_tokens": ["no"],
    "return_token_ids": ["true", 1, None, []],
    "foo": [1, "bar", None],
    "max_token": [5],
}
COMPLETION_BAD = {
    "prompt": [1, None, {}, True, [], [[]], [1.5], [-1], [2**40], ["a", 1], [[1], ["a"]], [True]],
    "logprobs": [21, -1, "1", True],
    "echo": [True, "x"],
    "best_of": [3, 0],
    "suffix": ["x", 1],
}
CHAT_BAD = {
    "messages": [
        [],
        None,
        "hi",
        {},
        [1],
        [{}],
        [{"role": "tool", "content": "x"}],
        [{"role": "bogus", "content": "x"}],
        [{"role": "user", "content": 1}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
        [{"role": "user", "content": [{"text": "x"}]}],
        [{"role": 1, "content": "x"}],
        [{"role": "user", "content": [1]}],
        [{"role": "user", "content": {"a": 1}}],
        [{"role": "user", "content": "x", "name": 1}],
    ],
    "logprobs": ["true", 1],
    "top_logprobs": [21, -1, 3],
    "max_completion_tokens": [0, "1", -5],
    "tools": [[{"type": "function", "function": {"name": "f"}}], "x"],
    "tool_choice": ["required", 1],
    "response_format": [{"type": "json_object"}, "json"],
    "functions": [[{"name": "f"}]],
    "modalities": [["audio"]],
    "audio": [{"voice": "x"}],
    "metadata": [{"a": 1}, "x"],
    "store": ["yes"],
}

BAD_BODIES = [
    b"", b"{", b"}", b"[", b"null", b"1", b'"str"', b"[]", b"[{}]", b"{'model': 'tiny'}",
    b'{"model": "tiny",}', b'{"model": tiny}', b"\xff\xfe\x00", b'{"model": "t\xffiny"}',
    b'{"model":"tiny","prompt":"\xc3\x28"}', b"NaN", b"[" * 10000 + b"]" * 10000,
    b'{"a":' * 5000, b"\x00" * 100, b'{"model":"tiny","prompt":"hi","max_tokens":NaN}',
    b'{"model":"tiny","prompt":"hi","max_tokens":1e400}', b'{"model":"tiny","prompt":"\\ud800"}',
    b'{"model":"tiny","prompt":"hi","temperature":Infinity}', b"true", b"{}",
]  # fmt: skip


def hostile_requests(max_len: int) -> list[tuple[str, str, dict, bytes, int | None, str | None]]:
    """(method, path, headers, body, expected status or None for any 4xx, expected param)."""
    out = []

    def add(path, body, status=400, param=None, method="POST", headers=AUTH):
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        out.append((method, path, headers, raw, status, param))

    for path, base, extra in (
        ("/v1/completions", COMPLETION, COMPLETION_BAD),
        ("/v1/chat/completions", CHAT_BODY, CHAT_BAD),
    ):
        for field, values in {**COMMON_BAD, **extra}.items():
            for v in values:
                add(path, {**base, field: v}, 400, field)
        for b in BAD_BODIES:
            add(path, b, 400)
        rng = random.Random(0)
        good = json.dumps(base).encode()
        for _ in range(8):  # truncated and random bytes
            add(path, good[: rng.randrange(1, len(good) - 1)], 400)
            add(path, rng.randbytes(rng.randrange(1, 200)), 400)
        for model in ("nope", "TINY", "tiny ", "x" * 300):
            add(path, {**base, "model": model}, 404, "model")
        # Lengths: past the context, or token ids past the vocabulary (the engine says so).
        add(path, {**base, "max_tokens": max_len}, 400)
        add(path, {**base, "max_tokens": 2**31 - 1}, 400)
        add(path, {**base, "seed": 2**63 - 1, "n": 2}, 400, "seed")
        del_model = {k: v for k, v in base.items() if k != "model"}
        add(path, del_model, 400, "model")
        add(path, {**base, "model": "tiny"}, 401, None, headers={})
        add(
            path,
            {**base, "model": "tiny"},
            401,
            None,
            headers={"Authorization": "Bearer " + "k" * 10000},
        )
        add(
            path,
            {**base, "model": "tiny"},
            401,
            None,
            headers={"Authorization": b"Bearer \xc3\xa9t\xc3\xa9"},
        )
        add(path, {**base, "padding": "x" * (1 << 20)}, 413)
        add(path, {"model": "tiny"}, 400)
        add(path, b"", 405, method="GET")
        add(path, b"", 405, method="PUT")
    c = "/v1/completions"
    add(c, {**COMPLETION, "prompt": "hi " * (max_len + 10)}, 400, "prompt")
    add(c, {**COMPLETION, "prompt": [5] * max_len}, 400, "prompt")
    add(c, {**COMPLETION, "prompt": [5, 100000]}, 400)
    add(c, {**COMPLETION, "prompt": ["hi"] * 100, "n": 3}, 400, "n")
    add(c, {**COMPLETION, "prompt": [[5], []]}, 400, "prompt")
    add("/v1/chat/completions", {**CHAT_BODY, "messages": [
        {"role": "user", "content": "hi " * (max_len + 10)}]}, 400, "messages")  # fmt: skip
    add("/v1/models", b"", 405)
    add("/v1/nope", b"{}", 404)
    add("/v2/completions", json.dumps(COMPLETION).encode(), 404)
    return out


def test_hostile_requests_get_4xx_with_error_bodies(stack):
    cases = hostile_requests(stack.max_len)
    assert len(cases) >= 200
    n_calls = len(stack.backend.calls)
    failures = []
    with httpx2.Client(base_url=stack.url, timeout=30) as h:
        for method, path, headers, body, status, param in cases:
            r = h.request(method, path, headers=headers, content=body)
            try:
                err = assert_error_shape(r)
                assert status is None or r.status_code == status
                assert param is None or (err["param"] or "").startswith(param), err
                if r.status_code == 429:
                    assert "retry-after" in r.headers
            except AssertionError as e:
                failures.append((method, path, body[:120], r.status_code, r.text[:300], str(e)))
    assert not failures, "\n".join(map(repr, failures[:20]))
    # Only the out-of-vocabulary prompt reached the engine; the server is still healthy.
    assert len(stack.backend.calls) - n_calls <= 2
    assert httpx2.get(f"{stack.url}/health").status_code == 200
    r = stack.client.completions.create(model="tiny", prompt="still fine", max_tokens=3)
    assert r.usage.completion_tokens >= 1


def test_chunked_oversize_body_is_413(stack):
    def body():
        for _ in range(40):
            yield b"x" * (64 << 10)  # 2.5 MiB in all, no Content-Length

    r = httpx2.post(f"{stack.url}/v1/completions", headers=AUTH, content=body())
    assert r.status_code == 413 and assert_error_shape(r)["code"] == "request_too_large"
