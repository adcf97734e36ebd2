"""OpenAI-compatible client for replay: `POST /v1/completions` or `/v1/chat/completions` with
`stream: true` and `stream_options.include_usage`, one keep-alive HTTP/1.1 connection per
request in flight.

Why not a general HTTP library: the schedule must keep >= 1,000 requests/s with a p99 send lag
of a few milliseconds on 2 cores, and a general client costs about a millisecond of CPU per
streamed request. Here a request is written from `submit` itself when a connection is idle (no
task, no await), the response is parsed by httptools' C parser in protocol callbacks, and each
SSE event costs one json.loads. Time stamps are taken once per socket read.

A piece counts as a token piece when it carries non-empty text (`choices[].text` or
`choices[].delta.content`): the role-only first chunk of a chat stream does not start TTFT.
Token-id prompts also ask for `return_token_ids` (vLLM's field, splitserve's too): a chunk then
names its tokens in `choices[].token_ids`, which count instead of text, so tokens without text
of their own (random weights' often) are timed too. A server that sends no `token_ids` is
measured by text as before; `--extra '{"return_token_ids": false}'` turns the field off.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import httptools

from loadgen.outcome import Done, Outcome
from loadgen.workload import Planned

perf = time.perf_counter


class HttpClient:
    def __init__(
        self,
        base_url: str,
        model: str,
        chat: bool = False,
        timeout_s: float = 600.0,
        ignore_eos: bool = True,
        extra_body: dict | None = None,
    ) -> None:
        u = urlsplit(base_url.rstrip("/"))
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"bad endpoint URL {base_url!r}: expected http(s)://HOST[:PORT]/v1")
        self.host = u.hostname
        self.port = u.port or (443 if u.scheme == "https" else 80)
        self.ssl = ssl.create_default_context() if u.scheme == "https" else None
        path = u.path or "/v1"
        self.path = f"{path}/chat/completions" if chat else f"{path}/completions"
        self.chat, self.model, self.timeout_s = chat, model, timeout_s
        self.ignore_eos, self.extra_body = ignore_eos, extra_body or {}
        host = self.host if u.port is None else f"{self.host}:{u.port}"
        self._head = (
            f"POST {self.path} HTTP/1.1\r\nHost: {host}\r\n"
            "Content-Type: application/json\r\nAccept: text/event-stream\r\n"
        )
        self._idle: list[_Conn] = []
        self._all: set[_Conn] = set()
        self._connecting: set[asyncio.Task] = set()
        self.connections_opened = 0

    def body(self, p: Planned) -> bytes:
        b: dict = {
            "model": self.model,
            "max_tokens": p.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.ignore_eos:
            b["ignore_eos"] = True  # an extension (vLLM, splitserve): output length as planned
        if p.priority is not None:
            b["priority"] = p.priority  # an extension (vLLM, splitserve): engine priority
        if self.chat:
            b["messages"] = [{"role": "user", "content": p.prompt.text}]
        elif p.prompt.ids is not None:
            b["prompt"] = list(p.prompt.ids)
            b["return_token_ids"] = True
        else:
            b["prompt"] = p.prompt.text
        b.update(self.extra_body)
        return json.dumps(b, separators=(",", ":")).encode()

    def request_bytes(self, p: Planned) -> bytes:
        body = self.body(p)
        auth = f"Authorization: Bearer {p.api_key}\r\n" if p.api_key else ""
        return f"{self._head}{auth}Content-Length: {len(body)}\r\n\r\n".encode() + body

    async def _connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(
            lambda: _Conn(self),
            self.host,
            self.port,
            ssl=self.ssl,
            server_hostname=self.host if self.ssl else None,
        )
        self._all.add(conn)
        self.connections_opened += 1
        return conn

    async def open(self, connections: int) -> None:
        """Connect `connections` idle connections ahead of the schedule, so the first requests
        don't pay for TCP (and TLS) set-up; raises OSError when the endpoint is unreachable."""
        conns = await asyncio.gather(*(self._connect() for _ in range(max(1, connections))))
        self._idle.extend(conns)

    def submit(self, p: Planned, out: Outcome, done: Done) -> None:
        data = self.request_bytes(p)
        while self._idle:
            conn = self._idle.pop()
            if conn.usable:
                conn.start(data, out, done, reused=True)
                return
        self.send_on_new_connection(data, out, done)

    async def _connect_and_send(self, data: bytes, out: Outcome, done: Done) -> None:
        try:
            conn = await asyncio.wait_for(self._connect(), self.timeout_s)
        except (OSError, TimeoutError) as e:
            out.error = f"connect: {e or type(e).__name__}"
            done(out)
            return
        conn.start(data, out, done, reused=False)

    def send_on_new_connection(self, data: bytes, out: Outcome, done: Done) -> None:
        task = asyncio.get_running_loop().create_task(self._connect_and_send(data, out, done))
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)

    def release(self, conn: _Conn) -> None:
        if conn.usable:
            self._idle.append(conn)

    def forget(self, conn: _Conn) -> None:
        self._all.discard(conn)

    async def close(self) -> None:
        for t in list(self._connecting):
            t.cancel()
        for c in list(self._all):
            c.close()
        self._idle.clear()


class _Conn(asyncio.Protocol):
    """One connection. Between requests it sits in the client's idle list."""

    def __init__(self, client: HttpClient) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.out: Outcome | None = None
        self.done: Done | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.now = 0.0
        self.sse = bytearray()
        self.error_body = bytearray()
        self.status = 0
        self.keep_alive = True
        self.reused = False  # the request in flight went out on a connection that sat idle
        self.data = b""  # the request in flight, to resend if an idle close raced it
        self.answered = False  # any byte of the response arrived

    @property
    def usable(self) -> bool:
        return self.transport is not None and not self.transport.is_closing() and self.keep_alive

    def connection_made(self, transport) -> None:
        self.transport = transport

    def start(self, data: bytes, out: Outcome, done: Done, reused: bool) -> None:
        self.out, self.done = out, done
        self.sse.clear()
        self.error_body.clear()
        self.status = 0
        self.data, self.answered, self.reused = data, False, reused
        assert self.transport is not None
        out.sent = perf()
        self.transport.write(data)
        self.timer = asyncio.get_running_loop().call_later(
            self.client.timeout_s, self._fail, f"timeout after {self.client.timeout_s:g} s"
        )

    def data_received(self, data: bytes) -> None:
        self.now = perf()
        self.answered = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(f"bad HTTP response: {e}")

    def connection_lost(self, exc) -> None:
        self.transport = None
        self.client.forget(self)
        if self.out is None:
            return
        if self.reused and not self.answered and (exc is None or isinstance(exc, OSError)):
            # The server closed a kept-alive connection as the request went out (an idle
            # timeout race): nothing was processed, so it goes again on a new connection, as
            # HTTP clients do. Its send time is then the second write's.
            out, done = self.out, self.done
            self.out = self.done = None
            if self.timer is not None:
                self.timer.cancel()
            self.client.send_on_new_connection(self.data, out, done)
            return
        self._fail(f"connection lost: {exc or 'closed by the server'}")

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # -- httptools callbacks ---------------------------------------------------------------

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        if self.out is None:
            return
        if self.status != 200:
            if len(self.error_body) < 4096:
                self.error_body += body
            return
        if b"\r" in body:  # SSE allows CRLF line ends; events are then split the same way
            body = body.replace(b"\r\n", b"\n")
        self.sse += body
        end = self.sse.rfind(b"\n\n")
        if end < 0:
            return
        events = bytes(self.sse[:end])
        del self.sse[: end + 2]
        _events(events, self.out, self.now, self._fail)

    def on_message_complete(self) -> None:
        out = self.out
        if out is None:
            return
        if self.status != 200:
            return self._fail(f"HTTP {self.status}: {_error_message(bytes(self.error_body))}")
        if self.sse.strip():
            _events(bytes(self.sse), out, self.now, self._fail)
        if self.out is None:  # an error event failed it
            return
        out.end = self.now
        if not out.output_tokens:
            out.output_tokens = len(out.chunk_times)
        if out.error is None and not out.chunk_times:
            out.error = "the stream ended without tokens"
        self._finish()

    def _finish(self) -> None:
        out, done = self.out, self.done
        self.out = self.done = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.client.release(self)
        assert out is not None and done is not None
        done(out)

    def _fail(self, why: str) -> None:
        if self.out is None:
            return
        self.out.error = why
        self.keep_alive = False  # the rest of this response would confuse the next request
        self.close()
        self._finish()


def _events(data: bytes, out: Outcome, now: float, fail: Callable[[str], None]) -> None:
    """Applies the SSE events in `data` (complete events only) to `out`."""
    for line in data.split(b"\n"):
        if not line.startswith(b"data:"):
            continue  # comments, event names, blank separators
        payload = line[5:].strip()
        if payload == b"[DONE]" or not payload:
            continue
        try:
            obj = json.loads(payload)
        except ValueError:
            return fail(f"bad SSE data: {payload[:80]!r}")
        if "error" in obj:
            return fail(f"error event: {_error_message(payload)}")
        for c in obj.get("choices") or ():
            ids = c.get("token_ids")
            if ids is not None:
                if ids:
                    out.piece(now, len(ids))
                continue
            text = c.get("text")
            if text is None:
                text = (c.get("delta") or {}).get("content")
            if text:
                out.piece(now)
        usage = obj.get("usage")
        if usage:
            out.output_tokens = int(usage.get("completion_tokens") or 0)
            out.prompt_tokens = int(usage.get("prompt_tokens") or out.prompt_tokens)
    return None


def _error_message(body: bytes) -> str:
    try:
        err = json.loads(body).get("error")
        msg = err.get("message") if isinstance(err, dict) else err
        return str(msg or body[:200].decode(errors="replace"))
    except (ValueError, AttributeError):
        return body[:200].decode(errors="replace") or "(no body)"
