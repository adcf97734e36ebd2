"""The router's two APIs under generated hostile input: HTTP from its own OpenAPI document
(schemathesis: bodies with any values their schemas allow, and bodies that break them), gRPC
Generate with generated protobuf messages (bench/proto_fuzz.py: extreme numbers, NaN, empty and
oversized fields, invalid UTF-8, unknown and mistyped fields, truncated bytes), and clients that
vanish at any point, over HTTP and gRPC.

Never a 5xx (gRPC: INTERNAL, UNKNOWN, UNAVAILABLE, ...), neither what clients saw nor what the
router's metrics counted; afterwards the server is healthy, serves a normal completion, every
tenant and router slot and every KV block is given back, and its memory stayed bounded.

A fixed budget, the same every run: derandomized Hypothesis (no example database), a bounded
number of examples, no shrinking (a failure is reported as drawn), client timeouts on every
call. The stack's model has a 128-token context so that any accepted request is cheap.
"""

from __future__ import annotations

import json
import socket
import struct
from collections import Counter

import grpc
import httpx2
import pytest
import schemathesis
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.parameters import ParameterLocation
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from bench.proto_fuzz import SERVER_FAILURES, TEXT, fixed_budget, st_request, weighted
from protos.splitserve.v1 import generate_pb2 as gpb
from router.admission import Gate
from tests.kv_helpers import wait_for
from tests.router_helpers import KEY, in_use, router_stack

HTTP_EXAMPLES = 120  # per generation mode
GRPC_EXAMPLES = 200
VANISH_EXAMPLES = 40
RSS_GROWTH_MAX = 512 << 20  # generous: what a leak per request would pass in no time

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


def rss() -> int:
    with open("/proc/self/status") as f:
        lines = f.read().splitlines()
    for line in lines:
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) << 10
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def stack(tiny_model_dir):
    gate = Gate(64, 64, max_queue_s=30)
    with router_stack(
        tiny_model_dir, engine={"max_model_len": 128}, admission=gate, broken_models=False
    ) as s:
        assert s.client.completions.create(model="tiny", prompt="warm", max_tokens=2)
        s.rss0 = rss()  # the serving processes (this one: the stack runs in-process)
        yield s


@pytest.fixture(autouse=True)
def healthy_after(stack):
    yield
    with httpx2.Client(base_url=stack.url, timeout=60) as h:
        assert h.get("/health").json() == {"status": "ok"}
        r = stack.client.completions.create(model="tiny", prompt="still fine", max_tokens=3)
        assert r.choices[0].finish_reason in ("length", "stop")
        statuses = server_statuses(h.get("/metrics").text)
    assert not [s for s in statuses if s >= 500], statuses  # what the router counted
    # Every slot and block comes back once the vanished clients' requests are aborted.
    main = stack.tenants.tenant("main")
    wait_for(lambda: (main.running, main.queued) == (0, 0), timeout=30)
    wait_for(lambda: (stack.admission.running, stack.admission.queued) == (0, 0), timeout=30)
    wait_for(lambda: in_use(stack) == 0, timeout=30)
    assert rss() - stack.rss0 < RSS_GROWTH_MAX, (rss() - stack.rss0) >> 20


def server_statuses(text: str) -> Counter:
    out: Counter = Counter()
    for fam in text_string_to_metric_families(text):
        if fam.name == "splitserve:router_requests":
            for s in fam.samples:
                if s.name.endswith("_total"):
                    out[int(s.labels["status"])] += int(s.value)
    return out


# -- HTTP ------------------------------------------------------------------------------------


def test_openapi_document_describes_the_api(stack):
    doc = httpx2.get(f"{stack.url}/openapi.json", timeout=30).json()  # no key needed
    assert set(doc["paths"]) == {
        "/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"
    }  # fmt: skip
    post = doc["paths"]["/v1/completions"]["post"]
    body = post["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/CompletionRequest"}
    schemas = doc["components"]["schemas"]
    assert set(schemas["CompletionRequest"]["required"]) == {"model", "prompt"}
    assert len(schemas["CompletionRequest"]["properties"]["prompt"]["oneOf"]) == 4
    assert schemas["ChatCompletionRequest"]["additionalProperties"] is False
    assert {"200", "400", "401", "404", "413", "429", "503"} <= set(post["responses"])
    assert "Retry-After" in post["responses"]["429"]["headers"]
    assert post["security"] == [{"bearer": []}]
    schema = schemathesis.openapi.from_dict(doc)
    assert len(list(schema.get_all_operations())) == 5


def test_openapi_document_without_auth_and_with_feedback():
    """Auth off: no security anywhere. IC-Cache on: POST /v1/feedback with its body schema."""
    from router.app import build_app
    from tests.router_helpers import InstantBackend

    doc = build_app(InstantBackend(), {}, None, iccache=object()).openapi()
    assert "securitySchemes" not in doc["components"]
    post = doc["paths"]["/v1/feedback"]["post"]
    assert post["security"] == [] and "401" not in post["responses"]
    assert doc["components"]["schemas"]["FeedbackRequest"]["required"] == ["id", "score"]
    assert len(list(schemathesis.openapi.from_dict(doc).get_all_operations())) == 6


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_http_fuzzed_from_the_openapi_document(stack, mode):
    """Positive: every body the schema allows gets its answer or a 4xx, as documented (status,
    content type, headers, body schema; streams event by event). Negative: every body that
    breaks the schema gets a 4xx. A wrong or missing key: 401, whatever the body."""
    doc = httpx2.get(f"{stack.url}/openapi.json", timeout=30).json()
    # The key is drawn here (right, wrong, none), not from the security scheme, so that
    # negative cases break the body.
    for ops in doc["paths"].values():
        for op in ops.values():
            op.pop("security", None)
    cases = schemathesis.openapi.from_dict(doc).as_strategy(generation_mode=mode)
    keys = weighted((6, st.just(KEY)), (1, st.just(None)), (1, st.just("sk-wrong")))
    seen: Counter = Counter()

    @fixed_budget(HTTP_EXAMPLES)
    @given(case=cases, key=keys, served=st.booleans())
    def run(case, key, served):
        body = case.body if isinstance(case.body, dict) else None
        if served and mode == GenerationMode.POSITIVE and body and "model" in body:
            body["model"] = "tiny"  # a random name is a 404: reach the engine half the time
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        r = case.call(base_url=stack.url, headers=headers, timeout=60)
        seen[r.status_code] += 1
        assert r.status_code < 500, (case.body, r.text[:500])
        case.validate_response(r, checks=CHECKS)
        if case.operation.path.startswith("/v1/") and key != KEY:
            assert r.status_code == 401, (key, r.status_code, r.text[:300])
        elif _negative(case, ParameterLocation.BODY):
            assert 400 <= r.status_code < 500, (case.body, r.status_code, r.text[:300])

    run()
    assert seen[401] and seen[400]
    if mode == GenerationMode.POSITIVE:
        assert seen[200] >= HTTP_EXAMPLES // 10, seen  # deep enough: many reached the engine


def _negative(case, location: ParameterLocation) -> bool:
    """Whether the case breaks the schema at this location."""
    info = case.meta.components.get(location) if case.meta is not None else None
    return info is not None and info.mode == GenerationMode.NEGATIVE


BODIES = [
    {"model": "tiny", "prompt": "hello", "max_tokens": 40, "ignore_eos": True, "stream": True},
    {"model": "tiny", "prompt": "hello", "max_tokens": 40, "ignore_eos": True, "n": 3},
    {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 30,
     "stream": True, "stream_options": {"include_usage": True}},
]  # fmt: skip


def _request(body: bytes, declared: int, path: str) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: fuzz\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {declared}\r\n\r\n"
    )
    return head.encode() + body


@fixed_budget(VANISH_EXAMPLES)
@given(
    which=st.sampled_from(range(len(BODIES))),
    how=st.sampled_from(["cut", "short_body", "read_some", "reset"]),
    frac=st.floats(0, 1),
    read=st.integers(1, 4096),
)
def test_http_clients_that_vanish(stack, which, how, frac, read):
    """A client that hangs up mid-headers, mid-body (or declares more body than it sends),
    after part of the answer, or with a TCP reset: the server lets go of everything it held
    (checked after the test) and counts no 5xx."""
    body = json.dumps(BODIES[which]).encode()
    path = "/v1/chat/completions" if "messages" in BODIES[which] else "/v1/completions"
    full = _request(body, len(body), path)
    host, port = stack.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as c:
        if how == "cut":
            c.sendall(full[: int(len(full) * frac)])
        elif how == "short_body":
            c.sendall(_request(body[: int(len(body) * frac)], len(body), path))
        else:
            c.sendall(full)
            if how == "read_some":
                c.recv(read)
            else:  # an RST instead of a FIN
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


# -- gRPC ------------------------------------------------------------------------------------

GENERATE = "/splitserve.v1.Generate/Generate"
REQUESTS = st_request(
    gpb.GenerateRequest.DESCRIPTOR,
    overrides={  # steered towards what gets served, so that many go deep
        "model": st.just(b"tiny"),
        "prompt": TEXT.filter(bool).map(str.encode),
        "role": st.sampled_from([b"user", b"system", b"assistant", b"tool"]),
    },
)


def test_grpc_fuzzed_with_generated_messages(stack):
    """Any bytes as a GenerateRequest, by any client: a status of the API (OK, INVALID_ARGUMENT,
    NOT_FOUND, UNAUTHENTICATED, RESOURCE_EXHAUSTED) or the client's own (CANCELLED,
    DEADLINE_EXCEEDED), never a server failure; an answer is well-formed to its end."""
    seen: Counter = Counter()
    with grpc.insecure_channel(stack.grpc) as ch:
        call = ch.unary_stream(GENERATE, response_deserializer=gpb.GenerateResponse.FromString)

        @fixed_budget(GRPC_EXAMPLES)
        @given(
            raw=REQUESTS,
            key=weighted((6, st.just(KEY)), (1, st.just(None)), (1, st.just("sk-wrong"))),
            how=weighted((4, st.just("all")), (1, st.just("first")), (1, st.just("deadline"))),
        )
        def run(raw, key, how):
            md = [("authorization", f"Bearer {key}")] if key else []
            timeout = 0.05 if how == "deadline" else 60
            code, msgs = "OK", []
            it = call(raw, metadata=md, timeout=timeout)
            try:
                for m in it:
                    msgs.append(m)
                    if how == "first":  # the client vanishes after the first message
                        it.cancel()
            except grpc.RpcError as e:
                code = e.code().name
                assert code not in SERVER_FAILURES, (code, e.details(), raw[:200])
                assert len((e.details() or "").encode()) <= 1100, code
            seen[code] += 1
            if key != KEY:
                assert code == "UNAUTHENTICATED" or how == "deadline", code
            elif code == "OK":
                assert msgs and msgs[-1].finish_reason in ("length", "stop"), msgs[-1:]
                assert sum(len(m.token_ids) for m in msgs) == msgs[-1].usage.completion_tokens

        run()
    assert seen["OK"] >= GRPC_EXAMPLES // 20 and seen["INVALID_ARGUMENT"], seen


def test_grpc_undecodable_requests_are_invalid_argument(stack):
    """Bytes protobuf refuses (a string that is not UTF-8, a message cut short) are the
    client's error: INVALID_ARGUMENT, not gRPC's UNKNOWN for a failed parse."""
    with grpc.insecure_channel(stack.grpc) as ch:
        call = ch.unary_stream(GENERATE, response_deserializer=gpb.GenerateResponse.FromString)
        good = gpb.GenerateRequest(model="tiny", prompt="hi").SerializeToString()
        for raw in (b"\x0a\x02\xff\xfe" + good, good[:-1], b"\x80" * 11):
            with pytest.raises(grpc.RpcError) as ei:
                list(call(raw, metadata=[("authorization", f"Bearer {KEY}")], timeout=30))
            assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, ei.value.details()
            assert "not a valid splitserve.v1.GenerateRequest" in ei.value.details()
        # Authentication comes first: without a key, that is what the client hears.
        with pytest.raises(grpc.RpcError) as ei:
            list(call(b"\x80" * 11, timeout=30))
        assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_grpc_huge_model_name_keeps_its_status(stack):
    """A megabyte-long unknown model name: NOT_FOUND with a short message (echoed whole, the
    details would overflow gRPC's header limit and the client would see RESOURCE_EXHAUSTED)."""
    with grpc.insecure_channel(stack.grpc, options=[("grpc.max_send_message_length", -1)]) as ch:
        call = ch.unary_stream(GENERATE, response_deserializer=gpb.GenerateResponse.FromString)
        raw = gpb.GenerateRequest(model="m" * 1_000_000, prompt="hi").SerializeToString()
        with pytest.raises(grpc.RpcError) as ei:
            list(call(raw, metadata=[("authorization", f"Bearer {KEY}")], timeout=30))
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND, ei.value.details()
    assert len(ei.value.details()) < 1100


def _h2_frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes([kind, flags])
        + struct.pack(">I", stream)
        + payload
    )


def _h2_call(message: bytes, declared: int, end_stream: bool) -> bytes:
    """A client's bytes for one Generate call over HTTP/2, by hand: the gRPC message's length
    prefix says `declared` bytes (more than it carries: a truncated stream)."""

    def header(name: str, value: str) -> bytes:  # HPACK literal, not indexed, no Huffman
        return b"\x00" + bytes([len(name)]) + name.encode() + bytes([len(value)]) + value.encode()

    headers = b"".join(header(n, v) for n, v in (
        (":method", "POST"), (":scheme", "http"), (":path", GENERATE), (":authority", "fuzz"),
        ("content-type", "application/grpc"), ("te", "trailers"),
        ("authorization", f"Bearer {KEY}"),
    ))  # fmt: skip
    data = b"\x00" + struct.pack(">I", declared) + message
    return (
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _h2_frame(4, 0, 0, b"")  # preface, SETTINGS
        + _h2_frame(1, 4, 1, headers)  # HEADERS, END_HEADERS
        + _h2_frame(0, 1 if end_stream else 0, 1, data)
    )  # fmt: skip


def test_grpc_port_with_truncated_streams_and_garbage(stack):
    """Hand-made HTTP/2 on the gRPC port: a whole call is answered (the framing is right), and
    calls whose message is cut short, whose stream never ends, or bytes that are not HTTP/2
    at all, leave the server serving."""
    host, port = stack.grpc.split(":")
    msg = gpb.GenerateRequest(model="tiny", prompt="hi").SerializeToString()

    def send(data: bytes, answer: bool) -> bytes:
        with socket.create_connection((host, int(port)), timeout=30) as c:
            c.sendall(data)
            got = b""
            while answer and b"grpc-status" not in got:
                chunk = c.recv(65536)
                assert chunk, got[-200:]
                got += chunk
            return got

    assert b"grpc-status\x010" in send(_h2_call(msg, len(msg), True), answer=True)
    for data in (
        _h2_call(msg, len(msg) + 50, True),  # fewer bytes than the length prefix says
        _h2_call(msg[:3], len(msg), True),
        _h2_call(msg[: len(msg) // 2], len(msg), False),  # the client goes mid-message
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\xff" * 64,
        b"POST /splitserve.v1.Generate/Generate HTTP/1.1\r\nHost: x\r\n\r\n",
        bytes(range(256)),
    ):
        send(data, answer=False)
    req = gpb.GenerateRequest(model="tiny", prompt="still serving")
    req.sampling.max_tokens = 3
    with grpc.insecure_channel(stack.grpc) as ch:
        call = ch.unary_stream(GENERATE, response_deserializer=gpb.GenerateResponse.FromString)
        msgs = list(call(req.SerializeToString(), metadata=[("authorization", f"Bearer {KEY}")],
                         timeout=60))  # fmt: skip
    assert msgs[-1].usage.completion_tokens == 3
