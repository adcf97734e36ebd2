"""Request migration over real servers: a decode replica killed with SIGKILL (or drained) in the
middle of its streams, and the router continuing each of them on another replica token for
token, over HTTP and gRPC; with no replica left, a clear error rather than a hang.

The replica that is lost holds its streams after a few tokens (tests.migration_helpers), so the
kill lands mid-stream on every request however fast or slow the machine is."""

from __future__ import annotations

import contextlib
import functools
import json
import random
import signal
import threading
from collections.abc import Iterator
from types import SimpleNamespace

import grpc
import httpx
import pytest

from kvstore.config import Membership
from kvstore.registry import list_replicas
from protos.splitserve.v1 import common_pb2, generate_pb2, generate_pb2_grpc
from router.app import build_app
from router.backend import PoolBackend
from router.config import ModelRoute, RouterConfig
from router.grpc_api import GenerateServicer
from router.metrics import RouterMetrics
from services.decode import DecodeServicer
from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.engine.sampling_params import SamplingParams
from services.engine.tokenizer import load_tokenizer
from tests.kv_helpers import wait_for
from tests.migration_helpers import held_decode, hold_streams, spawn_paused_decode
from tests.replica_helpers import decode_server, prefill_server
from tests.router_helpers import serve

AFTER = 4  # decode messages a lost replica sends before holding: 1 + AFTER tokens delivered
MAX_TOKENS = 40
# The tiny model's plain greedy output repeats one token; with a presence penalty every next
# token depends on those delivered, so a resumption must know them all to stay exact.
GREEDY = {"temperature": 0.0, "presence_penalty": 2.0}
SEEDED = {"temperature": 0.8, "top_p": 0.9, "seed": 11}


def _prompt(seed: int) -> list[int]:
    return random.Random(seed).choices(range(5, 2000), k=40)  # two full blocks and a partial


def _params(kind: dict, **kw) -> SamplingParams:
    return SamplingParams(**{"max_tokens": MAX_TOKENS, "ignore_eos": True, **kind, **kw})


@functools.cache
def _engine(model_dir) -> LLMEngine:
    return LLMEngine(model_dir, EngineConfig(num_kv_blocks=512), seed=0)


@contextlib.contextmanager
def router(
    model_dir, redis_url, namespace, loop_thread, resume_wait_s=10.0, mode="disaggregated"
) -> Iterator:
    """The router's HTTP and gRPC APIs over the pools in `namespace`, and (disaggregated) a
    prefill replica."""
    pre = prefill_server(model_dir, redis_url, namespace) if mode == "disaggregated" else None
    if pre is not None:
        loop_thread.run(pre.start())
    e = _engine(model_dir)
    config = RouterConfig(
        models=(ModelRoute(name="tiny", model_dir=str(model_dir), model_id=e.model_id,
                           block_size=e.block_size, max_model_len=e.max_model_len,
                           mode=mode),),
        cluster=Membership(redis_url=redis_url, namespace=namespace),
        auth=False, grpc_port=None, refresh_s=0.05, resume_wait_s=resume_wait_s,
    )  # fmt: skip
    metrics = RouterMetrics()
    tok = load_tokenizer(model_dir)
    grpc_backend = PoolBackend(config, metrics)  # its channels belong to the loop thread's loop

    async def start_grpc():
        g = grpc.aio.server()
        generate_pb2_grpc.add_GenerateServicer_to_server(
            GenerateServicer(grpc_backend, {"tiny": tok}, None), g
        )
        port = g.add_insecure_port("127.0.0.1:0")
        await g.start()
        return g, f"127.0.0.1:{port}"

    g, grpc_addr = loop_thread.run(start_grpc())
    app = build_app(PoolBackend(config, metrics), {"tiny": tok}, None, metrics=metrics)
    try:
        with serve(app) as url:
            yield SimpleNamespace(url=url, grpc=grpc_addr, metrics=metrics, tok=tok)
    finally:
        loop_thread.run(g.stop(None))
        loop_thread.run(grpc_backend.close())
        if pre is not None:
            loop_thread.run(pre.stop(drain_s=1))


def _decoders(redis_url: str, namespace: str, role: str = "decode") -> list:
    return list_replicas(redis_url, role, "tiny", namespace)


def _count(stack, name: str) -> float:
    return stack.metrics.registry.get_sample_value(f"{name}_total", {"model": "tiny"}) or 0.0


class Stream(threading.Thread):
    """One streamed request in a thread: `paused` is set once it has 1 + AFTER tokens (the
    lost replica holds it there); the result fields are filled when it ends."""

    def __init__(self, target) -> None:
        super().__init__(daemon=True)
        self.target = target
        self.paused = threading.Event()
        self.tokens: list = []  # token ids (gRPC) or token texts (HTTP logprobs)
        self.text, self.finish, self.usage, self.error = "", None, None, None

    def got(self, new: list) -> None:
        self.tokens += new
        if len(self.tokens) >= 1 + AFTER:
            self.paused.set()

    def run(self) -> None:
        try:
            self.target(self)
        except Exception as e:  # recorded for the test to assert on
            self.error = e
        finally:
            self.paused.set()  # never leave the test waiting on a stream that ended


def http_stream(stack, prompt: list[int], kind: dict, **extra) -> Stream:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": MAX_TOKENS, "ignore_eos": True,
            "stream": True, "logprobs": 0, "stream_options": {"include_usage": True},
            **kind, **extra}  # fmt: skip

    def go(s: Stream) -> None:
        with (
            httpx.Client(timeout=120) as h,
            h.stream("POST", stack.url + "/v1/completions", json=body) as r,
        ):
            assert r.status_code == 200, r.read()
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    s.error = chunk["error"]
                    continue
                s.usage = chunk.get("usage") or s.usage
                for c in chunk["choices"]:
                    s.text += c["text"]
                    s.finish = c["finish_reason"] or s.finish
                    s.got((c["logprobs"] or {}).get("tokens", []))

    return Stream(go)


def grpc_stream(stack, prompt: list[int], kind: dict) -> Stream:
    sampling = common_pb2.SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, **kind)
    req = generate_pb2.GenerateRequest(
        model="tiny", prompt_token_ids=generate_pb2.TokenIds(ids=prompt), sampling=sampling
    )

    def go(s: Stream) -> None:
        with grpc.insecure_channel(stack.grpc) as ch:
            for msg in generate_pb2_grpc.GenerateStub(ch).Generate(req, timeout=120):
                s.text += msg.text
                s.finish = msg.finish_reason or s.finish
                if msg.HasField("usage"):
                    s.usage = msg.usage
                s.got(list(msg.token_ids))

    return Stream(go)


def _reference(model_dir, prompt: list[int], params: SamplingParams):
    """The request run on one engine, uninterrupted."""
    return _engine(model_dir).generate([prompt], params)[0]


def _stop_across_the_cut(model_dir, prompt: list[int]) -> str:
    """A stop string of the greedy output that begins in the text delivered before the cut and
    ends after it: at the cut, its beginning is held back, and the resumed stream must still
    cut the text before it."""
    delivered = _reference(model_dir, prompt, _params(GREEDY, max_tokens=1 + AFTER)).text
    full = _reference(model_dir, prompt, _params(GREEDY)).text
    for start in range(len(delivered) - 1, 0, -1):
        for n in (2, 3, 4):
            stop = full[start : start + n]
            if start + n <= len(delivered) or full.find(stop) != start or not stop.strip():
                continue
            ref = _reference(model_dir, prompt, _params(GREEDY, stop=(stop,)))
            if ref.finish_reason == "stop" and len(ref.token_ids) > 1 + AFTER:
                return stop
    raise AssertionError(f"no stop string straddles the cut in {full!r}")


def _check_http(s: Stream, ref, tok) -> None:
    assert s.error is None, s.error
    assert s.tokens == [tok.decode([t], skip_special_tokens=False) for t in ref.token_ids]
    assert s.text == ref.text and s.finish == str(ref.finish_reason)
    assert s.usage["completion_tokens"] == len(ref.token_ids) and s.usage["prompt_tokens"] == 40


def _check_grpc(s: Stream, ref) -> None:
    assert s.error is None, s.error
    assert s.tokens == ref.token_ids
    assert s.text == ref.text and s.finish == str(ref.finish_reason)
    assert s.usage.completion_tokens == len(ref.token_ids) and s.usage.prompt_tokens == 40


def _start_and_wait_paused(streams: list[Stream]) -> None:
    for s in streams:
        s.start()
    for s in streams:
        assert s.paused.wait(120), "a stream never reached the replica's hold"
        assert s.error is None, s.error


def test_sigkilled_decode_replica_streams_continue_token_exact(
    tiny_model_dir, redis_url, namespace, loop_thread
):
    """Every request on a decode replica killed with SIGKILL mid-stream continues on the other
    one: HTTP and gRPC, greedy (with a penalty) and seeded, and a stop string that straddles
    the cut; each stream token-identical to an uninterrupted run, its usage counted once."""
    proc, _ = spawn_paused_decode(tiny_model_dir, redis_url, namespace, AFTER)
    survivor = None
    try:
        wait_for(lambda: _decoders(redis_url, namespace), 30)
        prompts = [_prompt(i) for i in range(5)]
        stop = _stop_across_the_cut(tiny_model_dir, prompts[4])
        with router(tiny_model_dir, redis_url, namespace, loop_thread) as stack:
            streams = [
                http_stream(stack, prompts[0], GREEDY),
                http_stream(stack, prompts[1], SEEDED),
                grpc_stream(stack, prompts[2], GREEDY),
                grpc_stream(stack, prompts[3], SEEDED),
                http_stream(stack, prompts[4], GREEDY, stop=stop),
            ]
            _start_and_wait_paused(streams)  # all on the only decode replica, held mid-stream
            survivor = decode_server(tiny_model_dir, redis_url, namespace)
            loop_thread.run(survivor.start())
            wait_for(lambda: len(_decoders(redis_url, namespace)) == 2, 30)
            proc.send_signal(signal.SIGKILL)
            for s in streams:
                s.join(120)
                assert not s.is_alive(), "a stream did not end"
            kinds = (GREEDY, SEEDED, GREEDY, SEEDED)
            refs = [_reference(tiny_model_dir, prompts[i], _params(k)) for i, k in enumerate(kinds)]
            refs.append(_reference(tiny_model_dir, prompts[4], _params(GREEDY, stop=(stop,))))
            _check_http(streams[0], refs[0], stack.tok)
            _check_http(streams[1], refs[1], stack.tok)
            _check_grpc(streams[2], refs[2])
            _check_grpc(streams[3], refs[3])
            _check_http(streams[4], refs[4], stack.tok)
            assert refs[4].finish_reason == "stop"
            assert _count(stack, "splitserve:requests_resumed") == 5
            assert _count(stack, "splitserve:requests_resume_failed") == 0
            scraped = httpx.get(stack.url + "/metrics", timeout=30).text
            assert 'splitserve:requests_resumed_total{model="tiny"} 5.0' in scraped
            usage = loop_thread.run(survivor.loop.call(lambda e: e.check_integrity()))
            assert usage.in_use == 0, usage
    finally:
        proc.kill()
        proc.wait(30)
        if survivor is not None:
            loop_thread.run(survivor.stop(drain_s=1))


@pytest.mark.parametrize("mode", ["disaggregated", "colocated"])
def test_drained_replica_hands_its_streams_over(
    tiny_model_dir, redis_url, namespace, loop_thread, monkeypatch, mode
):
    """A decode (or colocated) replica drained while its stream cannot finish in the drain
    time: once it stops, the stream continues on another replica, token-exact."""
    monkeypatch.setattr(DecodeServicer, "_decode", held_decode)
    colocated = mode == "colocated"
    role = "colocated" if colocated else "decode"
    leaving = decode_server(tiny_model_dir, redis_url, namespace, colocated=colocated)
    # Colocated, the replica sends the first token too: hold after as many tokens.
    hold_streams(leaving, AFTER + colocated)
    loop_thread.run(leaving.start())
    staying = None
    try:
        with router(tiny_model_dir, redis_url, namespace, loop_thread, mode=mode) as stack:
            stream = grpc_stream if colocated else http_stream  # both APIs, one mode each
            s = stream(stack, _prompt(7), SEEDED)
            _start_and_wait_paused([s])
            staying = decode_server(tiny_model_dir, redis_url, namespace, colocated=colocated)
            loop_thread.run(staying.start())
            wait_for(lambda: len(_decoders(redis_url, namespace, role)) == 2, 30)
            loop_thread.run(leaving.stop(drain_s=0.5))
            s.join(120)
            assert not s.is_alive(), "the stream did not end"
            ref = _reference(tiny_model_dir, _prompt(7), _params(SEEDED))
            if colocated:
                _check_grpc(s, ref)
            else:
                _check_http(s, ref, stack.tok)
            assert _count(stack, "splitserve:requests_resumed") == 1
    finally:
        if staying is not None:
            loop_thread.run(staying.stop(drain_s=1))


def test_request_with_no_replica_left_ends_with_a_clear_error(
    tiny_model_dir, redis_url, namespace, loop_thread
):
    """The only decode replica killed mid-stream, none to take over: the HTTP stream ends with
    an error event saying so (then [DONE]), the gRPC call with UNAVAILABLE; neither hangs."""
    proc, _ = spawn_paused_decode(tiny_model_dir, redis_url, namespace, AFTER)
    try:
        wait_for(lambda: _decoders(redis_url, namespace), 30)
        with router(tiny_model_dir, redis_url, namespace, loop_thread, resume_wait_s=1.0) as stack:
            h = http_stream(stack, _prompt(8), GREEDY)
            g = grpc_stream(stack, _prompt(9), SEEDED)
            _start_and_wait_paused([h, g])
            proc.send_signal(signal.SIGKILL)
            for s in (h, g):
                s.join(120)
                assert not s.is_alive(), "a stream did not end"
            assert len(h.tokens) == 1 + AFTER and h.finish is None
            assert h.error["code"] is None and h.error["type"] == "server_error", h.error
            assert "could not be resumed" in h.error["message"], h.error
            assert "no other decode replica was up" in h.error["message"], h.error
            assert isinstance(g.error, grpc.RpcError), g.error
            assert g.error.code() == grpc.StatusCode.UNAVAILABLE
            assert "could not be resumed" in g.error.details()
            assert _count(stack, "splitserve:requests_resume_failed") == 2
            assert _count(stack, "splitserve:requests_resumed") == 0
    finally:
        proc.kill()
        proc.wait(30)


def test_only_replica_losses_resume_and_no_more_than_max_resumes_times():
    """What counts as losing a replica (not a refusal of the request itself), a fresh request
    id per attempt, and the bound on attempts."""
    from grpc.aio import AioRpcError, Metadata

    from router.migration import Migration, ResumeFailedError
    from router.pd_client import Call
    from rpc.piece import Piece

    def err(code: grpc.StatusCode) -> AioRpcError:
        return AioRpcError(code, Metadata(), Metadata(), details="gone")

    run = Migration(Call([5, 6], _params(GREEDY), "req"), max_resumes=2)
    run.role, run.serving = "decode", "decode-a"
    for refused in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED):
        with pytest.raises(AioRpcError):  # the request's own fault, or a 429 still possible
            run.lose(err(refused))
    run.lose(err(grpc.StatusCode.UNAVAILABLE))
    assert run.lost == {"decode-a"} and run.attempt_call().request_id == "req-r1"
    run.deliver(Piece([7, 8], "xy"))
    run.serving = "decode-b"
    run.lose(err(grpc.StatusCode.RESOURCE_EXHAUSTED))  # tokens delivered: too late for a 429
    assert run.lost == {"decode-a", "decode-b"} and run.attempt_call().request_id == "req-r2"
    run.serving = "decode-c"
    with pytest.raises(ResumeFailedError, match=r"lost after 2 tokens .* lost 3 times"):
        run.lose(err(grpc.StatusCode.CANCELLED))


def test_decode_resumes_from_the_tokens_given_and_checks_them(tiny_model_dir, loop_thread):
    """The wire contract: a resumed Decode streams only what follows the tokens it was given
    (recomputing the prompt's KV when no blocks come), counts them in usage, and refuses
    tokens outside the vocabulary or already as many as max_tokens."""
    from protos.splitserve.v1 import decode_pb2, decode_pb2_grpc
    from rpc.sampling import sampling_to_pb

    server = decode_server(tiny_model_dir)  # a decode (not colocated) replica, no cluster
    loop_thread.run(server.start())
    params = _params(SEEDED, max_tokens=8)
    ref = _reference(tiny_model_dir, _prompt(3), params).token_ids

    async def decode(resume: list[int]):
        async with grpc.aio.insecure_channel(server.address) as ch:
            req = decode_pb2.DecodeRequest(
                model="tiny", prompt_token_ids=_prompt(3), sampling=sampling_to_pb(params),
                resume_token_ids=resume,
            )  # fmt: skip
            try:
                return [m async for m in decode_pb2_grpc.DecodeStub(ch).Decode(req, timeout=60)]
            except grpc.aio.AioRpcError as e:
                return e

    try:
        msgs = loop_thread.run(decode(ref[:3]))
        assert [t for m in msgs for t in m.token_ids] == ref[3:]
        assert msgs[-1].usage.completion_tokens == 8 and msgs[-1].usage.prompt_tokens == 40
        for bad, says in (([5, 5000], "outside the vocabulary"), (ref, "already generated")):
            e = loop_thread.run(decode(bad))
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and says in e.details(), e
    finally:
        loop_thread.run(server.stop(drain_s=1))


def test_a_fresh_request_waits_for_a_replica_being_replaced(
    tiny_model_dir, redis_url, namespace, loop_thread, monkeypatch
):
    """The only decode replica gone (its registration with it) and its replacement not up yet:
    a request sent now waits for the replacement as a resumption would (resume_wait_s), not
    the short wait of a model that never had a replica (FIRST_WAIT_S), so a replacement that
    takes longer than that costs the request time, not a 503."""
    from router import backend as pool_backend

    monkeypatch.setattr(pool_backend, "FIRST_WAIT_S", 0.5)
    first = decode_server(tiny_model_dir, redis_url, namespace)
    loop_thread.run(first.start())
    replacement = decode_server(tiny_model_dir, redis_url, namespace)
    body = {"model": "tiny", "prompt": _prompt(10), "max_tokens": 8, "temperature": 0,
            "ignore_eos": True}  # fmt: skip
    late = None
    try:
        wait_for(lambda: _decoders(redis_url, namespace), 30)
        with router(tiny_model_dir, redis_url, namespace, loop_thread, resume_wait_s=60) as stack:
            before = httpx.post(stack.url + "/v1/completions", json=body, timeout=60)
            assert before.status_code == 200, before.text
            loop_thread.run(first.stop(drain_s=0))
            wait_for(lambda: not _decoders(redis_url, namespace), 30)
            # Up only after several FIRST_WAIT_S: the request below must still be waiting.
            late = threading.Timer(2.0, lambda: loop_thread.run(replacement.start()))
            late.start()
            after = httpx.post(stack.url + "/v1/completions", json=body, timeout=120)
            assert after.status_code == 200, after.text
            assert after.json()["choices"][0]["text"] == before.json()["choices"][0]["text"]
    finally:
        if late is not None:
            late.join()
            loop_thread.run(replacement.stop(drain_s=0))
