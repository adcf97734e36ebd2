"""The HTTP/SSE and gRPC clients against real servers on 127.0.0.1 that answer in scripted,
deterministic ways: what counts as the first token, usage, keys per tenant, errors, a dropped
connection, a timeout; then the CLI end to end against the simulated endpoint."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import grpc
import pytest
from typer.testing import CliRunner

from loadgen.cli import app
from loadgen.grpc_client import GrpcClient
from loadgen.http_client import HttpClient, _events
from loadgen.outcome import Outcome
from loadgen.prompts import PromptFactory
from loadgen.replay import replay
from loadgen.sim_server import LatencyModel, SimServer
from loadgen.trace import Trace, TraceRequest
from loadgen.workload import ReplayConfig, Tenant, plan
from protos.splitserve.v1 import generate_pb2 as pb
from protos.splitserve.v1 import generate_pb2_grpc as pb_grpc


def _chunk(s: str) -> bytes:
    data = s.encode()
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


class ScriptedServer:
    """Answers by the request's `model`; records each request's headers and body, and when it
    (on the client's clock: same process) received the request and wrote each part of the answer
    (`marks`, in the order of `seen`)."""

    def __init__(self) -> None:
        self.seen: list[tuple[dict, dict]] = []
        self.marks: list[dict[str, float]] = []
        self.handlers: set[asyncio.Task] = set()

    def request(self, model: str, prompt: str) -> tuple[dict, dict[str, float]]:
        """(headers, marks) of the one chat request for this model with this prompt: requests on
        several connections may arrive in any order."""
        (i,) = [
            i
            for i, (_, b) in enumerate(self.seen)
            if b["model"] == model and b["messages"][0]["content"] == prompt
        ]
        return self.seen[i][0], self.marks[i]

    async def __aenter__(self):
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/v1"
        return self

    async def __aexit__(self, *exc):
        self.server.close()
        for t in self.handlers:
            t.cancel()
        await asyncio.gather(*self.handlers, return_exceptions=True)

    async def handle(self, reader, writer):
        task = asyncio.current_task()
        self.handlers.add(task)
        served = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                headers = {
                    k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:] if x)
                }
                body = json.loads(await reader.readexactly(int(headers["content-length"])))
                marks = {"received": time.perf_counter()}
                self.seen.append((headers, body))
                self.marks.append(marks)
                served += 1
                if body["model"] == "idle-close" and served > 1:
                    break  # as a server closing an idle keep-alive connection would
                if not await self.answer(body["model"], writer, marks):
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            self.handlers.discard(task)

    async def answer(self, model: str, w, marks: dict[str, float]) -> bool:
        if model == "denied":
            msg = json.dumps({"error": {"message": "invalid API key", "type": "auth"}}).encode()
            w.write(
                b"HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(msg), msg)
            )
            return True
        w.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )

        def event(obj) -> str:
            return f"data: {json.dumps(obj)}\r\n\r\n"  # CRLF line ends, as SSE allows

        # A chat stream opens with a role-only chunk: no text, so no first token yet.
        marks["role"] = time.perf_counter()
        w.write(
            _chunk(
                event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
            )
        )
        await w.drain()
        await asyncio.sleep(0.03)
        first = event({"choices": [{"index": 0, "delta": {"content": " a"}}]})
        if model == "split":  # one event cut across two chunks and two reads
            w.write(_chunk(first[:9]))
            await w.drain()
            await asyncio.sleep(0.01)
            marks["text"] = time.perf_counter()  # the first text is whole from here on
            w.write(_chunk(first[9:]))
        else:
            marks["text"] = time.perf_counter()
            w.write(_chunk(first))
        await w.drain()
        if model == "drop":
            return False
        if model == "hang":
            await asyncio.sleep(5)
            return False
        await asyncio.sleep(0.01)
        if model == "error-event":
            w.write(_chunk(event({"error": {"message": "backend died"}})))
            w.write(b"0\r\n\r\n")
            return True
        tail = event({"choices": [{"index": 0, "delta": {"content": " b c"}}]})
        tail += event({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
        tail += event({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}})
        tail += "data: [DONE]\r\n\r\n"
        marks["tail"] = time.perf_counter()
        w.write(_chunk(tail) + b"0\r\n\r\n")
        await w.drain()
        return True


ONE_TENANT = (Tenant("a", "key-a"),)


def _planned(n: int, tenants=ONE_TENANT, prompt_tokens=5, gap=0.01):
    tr = Trace("t", [TraceRequest(i * gap, prompt_tokens, 3) for i in range(n)])
    return plan(tr, ReplayConfig(tenants=tenants, seed=3), PromptFactory())


async def _run(url, model, planned, chat=True, timeout_s=60.0):
    return await replay(planned, HttpClient(url, model, chat=chat, timeout_s=timeout_s), 2)


def test_http_stream_times_usage_and_keys():
    tenants = (Tenant("a", "key-a", 1), Tenant("b", "key-b", 1))
    planned, planned_split = _planned(6, tenants, gap=0.06), _planned(1)

    async def main():
        async with ScriptedServer() as srv:
            res = await _run(srv.url, "ok", planned)
            split = await _run(srv.url, "split", planned_split)
            return srv, res, split

    srv, res, split = asyncio.run(main())
    seen = srv.seen
    for o in res.outcomes:
        assert o.ok, o.error
        _, m = srv.request("ok", planned[o.index].prompt.text)
        # Checked by order, not by wall-clock gaps (a busy client may read several writes at
        # once): the role-only chunk went out 30 ms before the first text, and TTFT ends no
        # sooner than that text was written. Each text piece is stamped at its own arrival.
        assert o.sent <= m["received"] <= m["role"] < m["text"] <= o.first_token
        assert len(o.chunk_times) == 2  # " a" and " b c": pieces with text
        assert (o.output_tokens, o.prompt_tokens) == (3, 7)  # from usage, not piece counts
        assert o.chunk_times[0] == o.first_token and m["tail"] <= o.chunk_times[1] <= o.end
        assert o.tpot == pytest.approx((o.end - o.first_token) / 2)
    assert res.connections_opened == 2  # the two opened up front, kept alive and reused
    _, body = seen[0]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 3 and body["ignore_eos"] is True
    assert len(body["messages"][0]["content"].split()) == 5
    assert {o.tenant for o in res.outcomes} == {"a", "b"}
    for o in res.outcomes:  # each request carried its tenant's key
        headers, _ = srv.request("ok", planned[o.index].prompt.text)
        assert headers["authorization"] == f"Bearer key-{o.tenant}"
    # A first event cut in two counts once whole: not before its second half was written.
    o = split.outcomes[0]
    assert o.ok and o.first_token >= srv.request("split", planned_split[0].prompt.text)[1]["text"]


def test_http_counts_token_ids_where_chunks_carry_them_else_text():
    """With `token_ids` a chunk counts by its ids (a token without text is still a piece; text
    without ids is none); without them, by text as ever."""

    def run(*chunks: dict) -> Outcome:
        o = Outcome(0, "t", False, 0.0, 1, 8)
        data = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks).encode()
        _events(data, o, 1.0, lambda why: pytest.fail(why))
        return o

    o = run({"choices": [{"text": "", "token_ids": [1, 2]}]},
            {"choices": [{"text": "x", "token_ids": []}]},
            {"choices": [{"text": "", "token_ids": [3]}]})  # fmt: skip
    assert (len(o.chunk_times), o.output_tokens) == (2, 3)
    o = run({"choices": [{"text": "a"}]}, {"choices": [{"text": ""}]})  # a server without ids
    assert (len(o.chunk_times), o.output_tokens) == (1, 0)


@pytest.mark.parametrize(
    ("model", "error"),
    [
        ("denied", "HTTP 401: invalid API key"),
        ("error-event", "error event: backend died"),
        ("drop", "connection lost"),
        ("hang", "timeout after 0.3 s"),
    ],
)
def test_http_failures_are_reported_not_raised(model, error):
    async def main():
        async with ScriptedServer() as srv:
            # Only the hang waits for the timeout (the server holds it 5 s); the others answer at
            # once and keep the default, which a busy machine cannot run into.
            timeout = {"timeout_s": 0.3} if model == "hang" else {}
            return await _run(srv.url, model, _planned(2), **timeout)

    res = asyncio.run(main())
    for o in res.outcomes:
        assert not o.ok
        assert o.error.startswith(error), o.error


def test_http_request_racing_an_idle_close_is_sent_again():
    # Every connection serves one request and then closes on the next without an answer: each
    # later request goes out on a kept-alive connection, meets the close, and is resent.
    async def main():
        async with ScriptedServer() as srv:
            return srv.seen, await _run(srv.url, "idle-close", _planned(4, gap=0.06))

    seen, res = asyncio.run(main())
    assert all(o.ok for o in res.outcomes), [o.error for o in res.outcomes]
    assert len(seen) > 4  # the raced sends reached the server and were dropped there
    assert res.connections_opened > 2


def test_http_unreachable_endpoint_fails_fast():
    async def main():
        srv = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        srv.close()
        await srv.wait_closed()
        await replay(_planned(1), HttpClient(f"http://127.0.0.1:{port}/v1", "m"), 1)

    with pytest.raises(OSError):
        asyncio.run(main())


class Generate(pb_grpc.GenerateServicer):
    def __init__(self) -> None:
        self.requests: list[tuple[pb.GenerateRequest, dict]] = []
        self.marks: dict[str, float] = {}  # of the authorized request, on the client's clock

    async def Generate(self, request, context):
        md = dict(context.invocation_metadata())
        self.requests.append((request, md))
        if md.get("authorization") != "Bearer good":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid API key")
        self.marks["received"] = time.perf_counter()
        await asyncio.sleep(0.02)
        self.marks["first"] = time.perf_counter()
        yield pb.GenerateResponse(token_ids=[11], text=" x")
        await asyncio.sleep(0.01)
        last = pb.GenerateResponse(token_ids=[12, 13], text=" y z", finish_reason="length")
        last.usage.prompt_tokens = 5
        last.usage.completion_tokens = 3
        yield last


def test_grpc_client_streams_and_auth(tiny_model_dir):
    from services.engine.tokenizer import load_tokenizer

    async def main():
        server = grpc.aio.server()
        svc = Generate()
        pb_grpc.add_GenerateServicer_to_server(svc, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            tr = Trace(
                "t",
                [
                    TraceRequest(0.0, 5, 3, labels=(("who", "good"),)),
                    TraceRequest(0.01, 5, 3, labels=(("who", "bad"),)),
                ],
            )
            tenants = (Tenant("good", "good", 1), Tenant("bad", "nope", 1))
            f = PromptFactory(load_tokenizer(tiny_model_dir), "ids")
            planned = plan(tr, ReplayConfig(tenants=tenants, tenant_by="who"), f)
            res = await replay(planned, GrpcClient(f"grpc://127.0.0.1:{port}", "tiny"), 1)
        finally:
            await server.stop(None)
        return svc, res

    svc, res = asyncio.run(main())
    by = {o.tenant: o for o in res.outcomes}
    o = by["good"]
    # TTFT runs from the send to the first message with tokens, which left the server 20 ms
    # after the request arrived: checked by order, which a busy machine cannot upset.
    assert o.ok and o.sent <= svc.marks["received"] < svc.marks["first"] <= o.first_token
    assert (o.output_tokens, o.prompt_tokens, len(o.chunk_times)) == (3, 5, 2)
    assert by["bad"].error.startswith("UNAUTHENTICATED: missing or invalid API key")
    req, _ = svc.requests[0]
    assert req.WhichOneof("input") == "prompt_token_ids"
    assert len(req.prompt_token_ids.ids) == 5
    assert req.sampling.max_tokens == 3 and req.sampling.ignore_eos


@pytest.fixture
def sim_url():
    """The simulated endpoint on its own thread and loop (the CLI runs its own loop)."""
    loop = asyncio.new_event_loop()
    srv = SimServer(LatencyModel(ttft_base_s=0.004, tpot_s=0.001, prefill_slots=1))
    ready = threading.Event()

    def serve():
        asyncio.set_event_loop(loop)
        loop.run_until_complete(srv.start())
        ready.set()
        loop.run_forever()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    assert ready.wait(10)
    yield srv.url
    asyncio.run_coroutine_threadsafe(srv.stop(), loop).result(5)
    loop.call_soon_threadsafe(loop.stop)
    t.join(5)


def test_cli_run_goodput_and_compare(sim_url, tmp_path):
    runner = CliRunner()
    common = [
        "--url",
        sim_url,
        "--model",
        "sim",
        "--slo-ttft",
        "50",
        "--slo-tpot",
        "20",
        "--quiet",
        "--tenant",
        "a=ka:1",
        "--tenant",
        "b=kb:1",
    ]
    a = runner.invoke(
        app,
        [
            "run",
            "--trace",
            "mooncake-conversation",
            "--length-scale",
            "0.01",
            "--speedup",
            "40",
            "--requests",
            "40",
            "--warmup",
            "0.2",
            "--out",
            str(tmp_path / "a"),
            *common,
        ],
    )
    assert a.exit_code == 0, a.output
    rep = json.loads((tmp_path / "a" / "report.json").read_text())
    assert rep["kind"] == "run" and rep["summary"]["measured"] + 0 <= 40
    assert rep["summary"]["completed"] == rep["summary"]["measured"]
    assert set(rep["tenants"]) == {"a", "b"}
    assert rep["config"]["workload"]["trace"]["name"] == "mooncake-conversation"
    for png in ("ttft_cdf", "tpot_cdf", "throughput", "tenant_service"):
        assert (tmp_path / "a" / f"{png}.png").stat().st_size > 1000
    assert "TTFT" in a.output and "SLO TTFT <= 50 ms" in a.output

    g = runner.invoke(
        app,
        [
            "goodput",
            "--arrivals",
            "fixed:50",
            "--prompt-len",
            "fixed:8",
            "--output-len",
            "fixed:2",
            "--requests",
            "30",
            "--low",
            "50",
            "--high",
            "400",
            "--repeats",
            "1",
            "--tolerance",
            "0.3",
            "--out",
            str(tmp_path / "g"),
            *common,
        ],
    )
    assert g.exit_code == 0, g.output
    grep = json.loads((tmp_path / "g" / "report.json").read_text())
    # 4 ms of service on one slot: no queue below 250 req/s; 400 req/s queues 1.5 ms a request.
    assert 50 <= grep["goodput_rps"] <= 400
    assert (tmp_path / "g" / "attainment_vs_rate.png").exists()

    c = runner.invoke(
        app,
        [
            "compare",
            str(tmp_path / "a" / "report.json"),
            str(tmp_path / "g" / "report.json"),
            "--plots",
            str(tmp_path / "c"),
        ],
    )
    assert c.exit_code == 0, c.output
    assert "B/A" in c.output and "goodput req/s" in c.output
    assert (tmp_path / "c" / "ttft_cdf.png").exists()

    bad = runner.invoke(app, ["run", "--trace", str(tmp_path / "none.csv"), "--url", sim_url])
    assert bad.exit_code == 2 and "no such file" in bad.output
