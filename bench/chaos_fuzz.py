"""Hostile input against a running system: the chaos benchmark's `fuzz` fault.

For `seconds` (and at most a fixed number of examples per API), two generated streams of
requests, one after the other, while the benchmark's load runs:

  HTTP  cases drawn by schemathesis from the router's own OpenAPI document ({url}/openapi.json),
        bodies the schemas allow (half of them aimed at the served model, so that they reach
        the engine) and bodies that break them;
  gRPC  Generate requests as raw bytes from bench.proto_fuzz: extreme and negative numbers,
        NaN, empty and oversized fields, invalid UTF-8, unknown and mistyped fields, truncated
        messages; some clients give up after the first answer or after 50 ms.

A server-side failure is an HTTP status >= 500 (a 503 is documented only while a replica
drains, which this fault does not cause, so it counts too), a gRPC status among SERVER_FAILURES,
or a refused or reset connection (the server died). A client-side timeout is counted apart.
Nothing a server answers makes run() raise.
"""

from __future__ import annotations

import time
import warnings
from collections import Counter
from dataclasses import dataclass, field

import grpc
import requests
import schemathesis
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.errors import HypothesisWarning
from schemathesis import GenerationMode

from bench.proto_fuzz import SERVER_FAILURES, TEXT, fixed_budget, st_request, weighted
from protos.splitserve.v1 import generate_pb2 as gpb

HTTP_EXAMPLES = 400
GRPC_EXAMPLES = 400
SERVED_MAX_TOKENS = 16  # a case aimed at the served model stays cheap
SERVED_N = 2
CALL_TIMEOUT_S = 15.0
# A gRPC call may draw a large max_tokens; past this the client gives up (a client that
# vanishes, one more hostile case) rather than spend the fault's time on one answer.
GRPC_CALL_TIMEOUT_S = 3.0
MODEL = "tiny"
GENERATE = "/splitserve.v1.Generate/Generate"
# UNAVAILABLE: what a client sees of a server that is gone (no replica drains here).


class _TimeUp(Exception):
    """Raised in a Hypothesis test once the time is spent: it ends the generation at once."""


@dataclass
class Tally:
    requests: int = 0
    status_5xx: int = 0
    timeouts: int = 0
    statuses: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)  # the first few, for the report

    def saw(self, status: str, failed: bool, what: str = "") -> None:
        self.requests += 1
        self.statuses[status] += 1
        if failed:
            self.status_5xx += 1
            if len(self.failures) < 5:
                self.failures.append(f"{status}: {what[:300]}")


def _timeout(deadline: float) -> float:
    """A call may not outlast the time left (by much: a floor, so that a call can be made)."""
    return max(0.2, min(CALL_TIMEOUT_S, deadline - time.monotonic()))


def _time_up(deadline: float, tally: Tally, before: int) -> bool:
    """Whether a stream should stop: its time is spent and it has made at least one call. On a
    loaded machine building the strategies can use up a short budget; every stream still
    tries the server once, so that a dead one is seen."""
    return time.monotonic() >= deadline and tally.requests + tally.timeouts > before


def _aim(body: dict) -> None:
    """A schema-valid body aimed at the served model, with a short answer."""
    body["model"] = MODEL
    body.pop("max_completion_tokens", None)
    body["max_tokens"] = SERVED_MAX_TOKENS
    if isinstance(body.get("n"), int):
        body["n"] = min(body["n"], SERVED_N)


def fuzz_http(url: str, deadline: float, tally: Tally, examples: int = HTTP_EXAMPLES) -> None:
    try:
        doc = requests.get(f"{url}/openapi.json", timeout=_timeout(deadline)).json()
    except requests.RequestException as e:
        tally.saw("openapi.json unreachable", True, repr(e))
        return
    schema = schemathesis.openapi.from_dict(doc)
    cases = st.one_of(
        schema.as_strategy(generation_mode=GenerationMode.POSITIVE),
        schema.as_strategy(generation_mode=GenerationMode.NEGATIVE),
    )

    before = tally.requests + tally.timeouts

    @fixed_budget(examples)
    @given(case=cases, served=st.booleans())
    def one(case, served):
        if _time_up(deadline, tally, before):
            raise _TimeUp
        body = case.body if isinstance(case.body, dict) else None
        if served and body is not None and "model" in body:
            _aim(body)
        try:
            r = case.call(base_url=url, timeout=_timeout(deadline))
        except requests.Timeout:
            tally.timeouts += 1
            return
        except requests.ConnectionError as e:
            tally.saw("connection failed", True, f"{case.operation.path}: {e!r}")
            return
        tally.saw(str(r.status_code), r.status_code >= 500, f"{case.body!r} -> {r.text}")

    _until_time_up(one)


def _until_time_up(test) -> None:
    """Runs a Hypothesis test to its budget of examples or until the time is spent."""
    try:
        with warnings.catch_warnings():  # the stopping example's repr can be large
            warnings.simplefilter("ignore", HypothesisWarning)
            test()
    except _TimeUp:
        pass
    except BaseExceptionGroup as group:
        rest = group.subgroup(lambda e: not isinstance(e, _TimeUp))
        if rest is not None:
            raise rest from None


def fuzz_grpc(address: str, deadline: float, tally: Tally, examples: int = GRPC_EXAMPLES) -> None:
    raws = st_request(
        gpb.GenerateRequest.DESCRIPTOR,
        overrides={  # steered towards what gets served, so that many go deep
            "model": st.just(MODEL.encode()),
            "prompt": TEXT.filter(bool).map(str.encode),
            "role": st.sampled_from([b"user", b"system", b"assistant", b"tool"]),
        },
    )
    hows = weighted((4, st.just("all")), (1, st.just("first")), (1, st.just("deadline")))
    before = tally.requests + tally.timeouts
    with grpc.insecure_channel(address) as ch:
        call = ch.unary_stream(GENERATE, response_deserializer=gpb.GenerateResponse.FromString)

        @fixed_budget(examples)
        @given(raw=raws, how=hows)
        def one(raw, how):
            if _time_up(deadline, tally, before):
                raise _TimeUp
            first = tally.requests + tally.timeouts == before
            # The first call is given its full time, so that a loaded machine still gets an answer.
            budget = GRPC_CALL_TIMEOUT_S if first else min(GRPC_CALL_TIMEOUT_S, _timeout(deadline))
            timeout = 0.05 if how == "deadline" else budget
            it = call(raw, timeout=timeout)
            try:
                for _ in it:
                    if how == "first":  # the client vanishes after the first message
                        it.cancel()
            except grpc.RpcError as e:
                code = e.code().name
                if code == "DEADLINE_EXCEEDED" and how != "deadline":
                    tally.timeouts += 1
                    return
                tally.saw(code, code in SERVER_FAILURES, f"{raw[:100]!r}: {e.details()}")
                return
            tally.saw("OK", False)

        _until_time_up(one)


def run(url: str, grpc_address: str, seconds: float) -> dict:
    """Fuzz the HTTP API for half of `seconds`, then the gRPC API for the rest. url: the
    router's base URL (no /v1); grpc_address: host:port of gRPC Generate."""
    t0 = time.monotonic()
    tally = Tally()
    for fuzz, target, end in (
        (fuzz_http, url, t0 + seconds / 2),
        (fuzz_grpc, grpc_address, t0 + seconds),
    ):
        try:
            fuzz(target, end, tally)
        except Exception as e:  # a fuzzer's own failure is reported, never raised
            tally.failures.append(f"{fuzz.__name__} stopped: {e!r}"[:300])
    return {
        "requests": tally.requests,
        "status_5xx": tally.status_5xx,
        "timeouts": tally.timeouts,
        "statuses": dict(tally.statuses),
        "failures": tally.failures,
        "seconds": round(time.monotonic() - t0, 1),
    }
