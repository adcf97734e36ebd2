"""The router's cost and the whole stack as a user meets it.

1. Added latency: the same one-token request sent straight to a colocated decode server (gRPC,
   through the P/D client) and through the router's HTTP API in front of it; p50/p99 at 1 and
   64 concurrent streams. The HTTP client's own floor (a GET /health round trip) is shown too.
2. Router throughput: tokens/s one router replica streams as SSE, from a backend that answers
   at once (so the router is all that is measured).
3. End to end: `splitserve up` (Ray Serve, router, replicas), N concurrent streamed chats with
   the official openai client: output tokens/s, TTFT, TPOT.

    python bench/router.py [--quick] [--json PATH]

Summary keys: added_p50_ms (1 stream), router_tokens_per_s, e2e_tokens_per_s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import machine, write_report
from bench.up_process import free_port, splitserve_up
from router.app import build_app
from router.pd_client import PDClient
from services.engine.sampling_params import SamplingParams
from services.engine.tokenizer import load_tokenizer
from services.model_prep.presets import make_model
from tests.router_helpers import ColocatedBackend, InstantBackend, serve


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def timed_many(fn, concurrency: int, rounds: int) -> list[float]:
    lat: list[float] = []

    async def one():
        t = time.perf_counter()
        await fn()
        lat.append(time.perf_counter() - t)

    for _ in range(rounds):
        await asyncio.gather(*(one() for _ in range(concurrency)))
    return lat


def _spawn(args: list[str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    line = proc.stdout.readline().strip() if proc.stdout else ""
    if not line:
        proc.kill()
        raise RuntimeError(f"{args} did not start")
    return proc, line


def serve_router(decode_addr: str, model_dir: str) -> None:
    """The router app alone in this process (so it doesn't share a GIL with the bench client),
    in front of one colocated decode server; prints its URL."""
    tok = load_tokenizer(model_dir)
    app = build_app(ColocatedBackend({"tiny": (decode_addr, 2048)}), {"tiny": tok}, None)
    with serve(app) as url:
        print(url, flush=True)
        threading.Event().wait()


class RawHTTP:
    """A minimal keep-alive HTTP/1.1 client: the common Python clients cost more per request
    than the router does, which would measure the client, not the router."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.addr = (host, int(port))
        self.conns: list = []

    async def request(self, method: str, path: str, body: bytes = b"") -> bytes:
        conn = self.conns.pop() if self.conns else await asyncio.open_connection(*self.addr)
        reader, writer = conn
        head = (f"{method} {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
        writer.write(head + body)
        status_and_headers = await reader.readuntil(b"\r\n\r\n")
        status = int(status_and_headers.split(b" ", 2)[1])
        length = 0
        for line in status_and_headers.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        data = await reader.readexactly(length)
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {data[:200]!r}")
        self.conns.append(conn)
        return data

    async def close(self) -> None:
        for _, w in self.conns:
            w.close()


def added_latency(model_dir: Path, quick: bool) -> list[dict]:
    server, addr = _spawn(
        [
            "-m",
            "splitserve.cli",
            "serve",
            "colocated",
            "--model",
            str(model_dir),
            "--num-kv-blocks",
            "2048",
            "--max-waiting",
            "4096",
        ]
    )
    router, url = _spawn([__file__, "--serve-router", addr, str(model_dir)])  # fmt: skip
    tok = load_tokenizer(model_dir)
    prompt = tok.encode("How fast is the router?")
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 1, "temperature": 0}
    rows = []
    try:
        for conc, rounds in ((1, 100 if quick else 400), (64, 4 if quick else 12)):

            async def direct(conc=conc, rounds=rounds):
                async with PDClient(addr) as c:
                    await timed_many(lambda: c.complete(prompt, params), conc, 2)  # warm-up
                    return await timed_many(lambda: c.complete(prompt, params), conc, rounds)

            async def routed(conc=conc, rounds=rounds):
                h = RawHTTP(url)
                payload = json.dumps(body).encode()

                def one():
                    return h.request("POST", "/v1/completions", payload)

                try:
                    await timed_many(one, conc, 2)  # warm-up: connections, caches
                    health = await timed_many(lambda: h.request("GET", "/health"), conc, rounds)
                    return await timed_many(one, conc, rounds), health
                finally:
                    await h.close()

            d = asyncio.run(direct())
            r, health = asyncio.run(routed())
            row = {
                "part": "added_latency",
                "concurrency": conc,
                "direct_p50_ms": round(statistics.median(d) * 1e3, 3),
                "direct_p99_ms": round(pct(d, 0.99) * 1e3, 3),
                "router_p50_ms": round(statistics.median(r) * 1e3, 3),
                "router_p99_ms": round(pct(r, 0.99) * 1e3, 3),
                "http_floor_p50_ms": round(statistics.median(health) * 1e3, 3),
            }
            row["added_p50_ms"] = round(row["router_p50_ms"] - row["direct_p50_ms"], 3)
            row["added_p99_ms"] = round(row["router_p99_ms"] - row["direct_p99_ms"], 3)
            rows.append(row)
            print(
                f"added latency @{conc:>2}: p50 {row['added_p50_ms']:+.3f} ms "
                f"(direct {row['direct_p50_ms']:.3f}, router {row['router_p50_ms']:.3f}, "
                f"HTTP floor {row['http_floor_p50_ms']:.3f})  p99 {row['added_p99_ms']:+.3f}",
                flush=True,
            )
    finally:
        for p in (router, server):
            p.terminate()
            p.wait(30)
    return rows


def router_throughput(model_dir: Path, quick: bool) -> dict:
    import httpx

    app = build_app(InstantBackend(), {"tiny": load_tokenizer(model_dir)}, None)
    n = 5_000 if quick else 50_000
    body = {"model": "tiny", "prompt": "x", "max_tokens": n, "stream": True}
    with serve(app) as url, httpx.Client(base_url=url, timeout=120) as h:
        rates = []
        for _ in range(3):
            t = time.perf_counter()
            with h.stream("POST", "/v1/completions", json=body) as r:
                raw = b"".join(r.iter_bytes())
            rates.append(n / (time.perf_counter() - t))
            assert raw.count(b"data: ") == n + 1
    row = {"part": "router_throughput", "tokens": n, "tokens_per_s": round(max(rates), 1)}
    print(f"router streams {row['tokens_per_s']:.0f} tokens/s (one stream, one replica)")
    return row


QUESTIONS = [
    "What is the capital of France?", "Explain photosynthesis in one sentence.",
    "Give me three tips for better sleep.", "What is a prime number?",
    "Summarize the plot of Hamlet.", "How do vaccines work?", "Write a haiku about rain.",
    "Why is the sky blue?",
]  # fmt: skip


def end_to_end(model: str, mode: str, chats: int, tokens: int) -> dict:
    from openai import AsyncOpenAI

    args = ("--model", model, "--mode", mode, "--port", str(free_port()),
            "--grpc-port", str(free_port()))  # fmt: skip
    t_up = time.perf_counter()
    with splitserve_up(*args) as url:
        up_s = time.perf_counter() - t_up
        name = Path(model).name

        async def go():
            c = AsyncOpenAI(base_url=url + "/v1", api_key="demo", max_retries=0, timeout=600)
            await c.chat.completions.create(
                model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=2
            )

            async def chat(i):
                t0 = time.perf_counter()
                first, n = None, 0
                stream = await c.chat.completions.create(
                    model=name, messages=[{"role": "user", "content": QUESTIONS[i % 8]}],
                    max_tokens=tokens, temperature=0, stream=True,
                    stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
                )  # fmt: skip
                async for ch in stream:
                    if ch.choices and ch.choices[0].delta.content is not None and first is None:
                        first = time.perf_counter()
                    if ch.usage is not None:
                        n = ch.usage.completion_tokens
                end = time.perf_counter()
                return first - t0, (end - first) / max(1, n - 1), n

            t = time.perf_counter()
            res = await asyncio.gather(*(chat(i) for i in range(chats)))
            wall = time.perf_counter() - t
            await c.close()
            return res, wall

        res, wall = asyncio.run(go())
    out = sum(n for *_, n in res)
    row = {
        "part": "end_to_end", "model": model, "mode": mode, "chats": chats,
        "tokens_per_chat": tokens, "startup_s": round(up_s, 1), "wall_s": round(wall, 2),
        "output_tokens": out, "tokens_per_s": round(out / wall, 1),
        "ttft_mean_s": round(statistics.fmean(r[0] for r in res), 3),
        "tpot_mean_ms": round(statistics.fmean(r[1] for r in res) * 1e3, 1),
    }  # fmt: skip
    print(
        f"e2e {model} {mode}: {row['tokens_per_s']} tok/s, TTFT {row['ttft_mean_s']} s, "
        f"TPOT {row['tpot_mean_ms']} ms ({chats} chats x {tokens} tokens; up in {up_s:.0f} s)",
        flush=True,
    )
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--serve-router", nargs=2, metavar=("DECODE_ADDR", "MODEL_DIR"),
                    help=argparse.SUPPRESS)  # fmt: skip
    args = ap.parse_args(argv)
    if args.serve_router:
        serve_router(*args.serve_router)
        return 0
    print(f"machine: {machine()}", flush=True)
    import tempfile

    results: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        tiny = make_model("tiny", Path(tmp) / "tiny", seed=0)
        results += added_latency(tiny, args.quick)
        results.append(router_throughput(tiny, args.quick))
    if not args.skip_e2e:
        if args.quick:
            results.append(end_to_end("tiny", "disaggregated", 8, 16))
        else:
            for mode in ("disaggregated", "colocated"):
                results.append(end_to_end("smollm2-135m-instruct", mode, 32, 64))
    one = next(r for r in results if r["part"] == "added_latency" and r["concurrency"] == 1)
    e2e = [r for r in results if r["part"] == "end_to_end"]
    summary = {
        "added_p50_ms": one["added_p50_ms"],
        "router_tokens_per_s": next(
            r["tokens_per_s"] for r in results if r["part"] == "router_throughput"
        ),
        "e2e_tokens_per_s": e2e[0]["tokens_per_s"] if e2e else None,
    }
    for r in e2e:
        summary[f"e2e_{r['mode']}_tokens_per_s"] = r["tokens_per_s"]
    print("summary:", json.dumps(summary))
    write_report(args.json, "router", argv, results, summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
