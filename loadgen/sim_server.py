"""A simulated OpenAI-compatible endpoint whose latency is a known formula.

It is a real HTTP/1.1 server (keep-alive, chunked SSE) on asyncio protocols, small and fast
enough that one core serves thousands of streamed requests a second. Two uses:

- measuring the load generator itself (`bench/loadgen.py`): with a zero latency model it
  answers at once, so whatever lag is measured is the generator's;
- checking goodput bisection and the metric math against hand-computed numbers.

The latency model: a request waits for one of `prefill_slots` servers (FIFO; 0 means no queue),
holds it for `ttft_base_s + prefill_s_per_token * prompt_tokens`, then emits its first token and
the rest one every `tpot_s`. So with `prefill_slots=1` and fixed-rate arrivals the system is an
M/D/1-like queue with deterministic service: no wait below rate 1/service, growing wait above.

Prompt tokens: a token-id prompt counts its ids; a text prompt counts whitespace-separated
words (the generator's synthesized prompts are one word per token). Output: always
`max_tokens` tokens (as with ignore_eos), each one chunk ` tN`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass, field

_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found"}
MAX_BODY = 64 << 20


@dataclass(frozen=True)
class LatencyModel:
    ttft_base_s: float = 0.0
    prefill_s_per_token: float = 0.0
    tpot_s: float = 0.0
    prefill_slots: int = 0  # 0: every request starts at once

    def __post_init__(self) -> None:
        if min(self.ttft_base_s, self.prefill_s_per_token, self.tpot_s) < 0:
            raise ValueError("latency model times must be >= 0")
        if self.prefill_slots < 0:
            raise ValueError("prefill_slots must be >= 0")

    def prefill_s(self, prompt_tokens: int) -> float:
        return self.ttft_base_s + self.prefill_s_per_token * prompt_tokens

    @property
    def instant(self) -> bool:
        return self.prefill_s(1) == 0 and self.tpot_s == 0


@dataclass
class SimStats:
    requests: int = 0
    by_tenant: Counter = field(default_factory=Counter)
    prompt_tokens: int = 0


class SimServer:
    """`async with SimServer(model) as s:` serves on 127.0.0.1:<free port>; `s.url` is the base
    URL (`http://127.0.0.1:PORT/v1`). `api_keys` maps key -> tenant; when given, requests
    without a known Bearer key get 401."""

    def __init__(
        self,
        latency: LatencyModel | None = None,
        api_keys: dict[str, str] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.latency = latency or LatencyModel()
        self.api_keys = api_keys
        self.host, self.port = host, port
        self.stats = SimStats()
        self._server: asyncio.Server | None = None
        self._conns: set[_Conn] = set()
        # Monotonic time at which each prefill slot is next free (the FIFO queue's state).
        self._slots = [0.0] * self.latency.prefill_slots

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    async def start(self) -> SimServer:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Conn(self), self.host, self.port, backlog=4096
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for c in list(self._conns):
                if c.transport is not None:
                    c.transport.close()
            await self._server.wait_closed()

    async def __aenter__(self) -> SimServer:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    def admit(self, prompt_tokens: int) -> float:
        """Seconds from now until this request's first token, reserving a prefill slot."""
        service = self.latency.prefill_s(prompt_tokens)
        if not self._slots:
            return service
        now = time.monotonic()
        i = min(range(len(self._slots)), key=self._slots.__getitem__)
        start = max(now, self._slots[i])
        self._slots[i] = start + service
        return start + service - now


def _prompt_tokens(body: dict) -> int:
    if "messages" in body:
        return sum(len(str(m.get("content") or "").split()) for m in body["messages"])
    p = body.get("prompt", "")
    if isinstance(p, str):
        return len(p.split())
    if p and isinstance(p[0], int):
        return len(p)
    return sum(len(x) if isinstance(x, list) else len(x.split()) for x in p)


class _Conn(asyncio.Protocol):
    def __init__(self, server: SimServer) -> None:
        self.server = server
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.busy = False  # HTTP/1.1 without pipelining: one response at a time

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.server._conns.add(self)

    def connection_lost(self, exc) -> None:
        self.transport = None
        self.server._conns.discard(self)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._next()

    def _next(self) -> None:
        if self.busy or self.transport is None:
            return
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
        headers = {}
        for line in head[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        n = int(headers.get("content-length", "0"))
        if n > MAX_BODY:
            self.transport.close()
            return
        if len(self.buf) < end + 4 + n:
            return
        body = bytes(self.buf[end + 4 : end + 4 + n])
        del self.buf[: end + 4 + n]
        self.busy = True
        method, path, _ = [*head[0].split(" "), "", ""][:3]
        self._handle(method, path, headers, body)

    def _finish(self) -> None:
        self.busy = False
        if self.buf:
            self._next()

    def _send(self, status: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        assert self.transport is not None
        self.transport.write(
            f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n".encode()
            + data
        )
        self._finish()

    def _error(self, status: int, msg: str) -> None:
        self._send(status, {"error": {"message": msg, "type": "invalid_request_error"}})

    def _handle(self, method: str, path: str, headers: dict, body: bytes) -> None:
        srv = self.server
        kind = {"/v1/completions": "completion", "/v1/chat/completions": "chat"}.get(path)
        if method != "POST" or kind is None:
            return self._error(404, f"no route {method} {path}")
        tenant = ""
        if srv.api_keys is not None:
            auth = headers.get("authorization", "")
            tenant = srv.api_keys.get(auth[7:] if auth.startswith("Bearer ") else "")
            if tenant is None:
                return self._error(401, "invalid API key")
        try:
            req = json.loads(body)
            max_tokens = int(req.get("max_tokens") or req.get("max_completion_tokens") or 16)
            prompt_tokens = _prompt_tokens(req)
        except (ValueError, TypeError, AttributeError) as e:
            return self._error(400, f"bad request body: {e}")
        srv.stats.requests += 1
        srv.stats.by_tenant[tenant] += 1
        srv.stats.prompt_tokens += prompt_tokens
        stream = bool(req.get("stream"))
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": max_tokens,
            "total_tokens": prompt_tokens + max_tokens,
        }
        head = f'{{"id":"sim","object":"x","model":{json.dumps(req.get("model", ""))},"choices":'
        delay = srv.admit(prompt_tokens)
        if not stream:
            text = "".join(f" t{i}" for i in range(max_tokens))
            choice = {"index": 0, "finish_reason": "length"}
            if kind == "chat":
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            resp = {"id": "sim", "choices": [choice], "usage": usage}
            wait = delay + srv.latency.tpot_s * (max_tokens - 1)
            if wait <= 0:
                return self._send(200, resp)
            asyncio.get_running_loop().call_later(wait, self._send, 200, resp)
            return None
        opts = req.get("stream_options") or {}
        tail = ',"usage":null}\n\n' if opts.get("include_usage") else "}\n\n"

        def event(i: int) -> str:
            last = i == max_tokens - 1
            fin = '"length"' if last else "null"
            piece = f'"delta":{{"content":" t{i}"}}' if kind == "chat" else f'"text":" t{i}"'
            s = f'data: {head}[{{"index":0,{piece},"finish_reason":{fin}}}]{tail}'
            if last:
                if opts.get("include_usage"):
                    s += f'data: {head}[],"usage":{json.dumps(usage)}}}\n\n'
                s += "data: [DONE]\n\n"
            return s

        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        if srv.latency.instant:
            self._chunk("".join(event(i) for i in range(max_tokens)), end=True)
            return None
        loop = asyncio.get_running_loop()
        t0 = loop.time() + delay
        for i in range(max_tokens):
            loop.call_at(t0 + i * srv.latency.tpot_s, self._chunk, event(i), i == max_tokens - 1)
        return None

    def _chunk(self, s: str, end: bool = False) -> None:
        if self.transport is None:  # the client left; its later events have nobody to go to
            return
        data = s.encode()
        out = f"{len(data):x}\r\n".encode() + data + b"\r\n"
        if end:
            out += b"0\r\n\r\n"
        self.transport.write(out)
        if end:
            self._finish()


async def serve(latency: LatencyModel, host: str, port: int, announce=print) -> None:
    """Serve until cancelled (the CLI's `bench sim-server`)."""
    async with SimServer(latency, host=host, port=port) as s:
        announce(s.url)
        await asyncio.Event().wait()
