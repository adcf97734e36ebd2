"""The chaos benchmark's load: streamed completions whose every token can be checked.

Each request is greedy with a presence penalty (the tiny model's plain greedy output repeats
one token; with the penalty every token depends on all those before it, so a resumption that
lost or repeated one shows), on a prompt of random token ids, EOS ignored. Requests alternate
between the OpenAI HTTP API (`/v1/completions`, streamed, logprobs: the token texts) and gRPC
Generate (streamed token ids). The reference is the same request run uninterrupted on one local
engine of the same model (services.engine.LLMEngine, greedy on CPU float32).

Arrivals are steady (one every 1/rate s, open loop); every request and every wait is bounded
in time."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx

from bench.chaos_check import TokenCheck, compare

PRESENCE_PENALTY = 2.0
PROMPT_TOKENS = (24, 72)  # drawn per request in this range: one to four full blocks and a part
VOCAB = (5, 2000)  # the tiny preset's 2,048 ids, specials left out


@dataclass(frozen=True)
class Job:
    """One request of the load: its prompt, length, API, and what it must produce."""

    index: int
    prompt: list[int]
    max_tokens: int
    api: str  # "http" | "grpc"
    ref_ids: list[int] = field(default_factory=list)
    ref_texts: list[str] = field(default_factory=list)  # each token's text (HTTP logprobs)
    ref_text: str = ""


@dataclass
class Outcome:
    job: Job
    sent_s: float  # monotonic
    done_s: float = 0.0
    tokens: list = field(default_factory=list)  # token texts (HTTP) or ids (gRPC)
    text: str = ""
    finish: str | None = None
    error: str | None = None
    first_token_s: float | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.finish is not None

    def check(self) -> TokenCheck:
        ref = self.job.ref_texts if self.job.api == "http" else self.job.ref_ids
        return compare(self.tokens, ref)

    def text_ok(self) -> bool:
        return self.text == self.job.ref_text


def plan_jobs(n: int, max_tokens: int, seed: int, first_index: int = 0) -> list[Job]:
    rng = random.Random(seed)
    jobs = []
    for i in range(first_index, first_index + n):
        prompt = rng.choices(range(*VOCAB), k=rng.randint(*PROMPT_TOKENS))
        jobs.append(Job(i, prompt, max_tokens, "http" if i % 2 == 0 else "grpc"))
    return jobs


def with_references(jobs: Sequence[Job], model_dir: Path) -> list[Job]:
    """The jobs with their uninterrupted outputs, from one local engine (batched by length)."""
    import torch

    from services.engine.config import EngineConfig
    from services.engine.engine import LLMEngine
    from services.engine.sampling_params import SamplingParams

    torch.set_num_threads(1)  # leave the machine to the system under test
    engine = LLMEngine(model_dir, EngineConfig(num_kv_blocks=2048), seed=0)
    tok = engine.tokenizer
    greedy = {"temperature": 0.0, "presence_penalty": PRESENCE_PENALTY, "ignore_eos": True}
    params = {m: SamplingParams(max_tokens=m, **greedy) for m in {j.max_tokens for j in jobs}}
    out = []
    for k in range(0, len(jobs), 32):
        batch = jobs[k : k + 32]
        done = engine.generate([j.prompt for j in batch], [params[j.max_tokens] for j in batch])
        for j, c in zip(batch, done, strict=True):
            texts = [tok.decode([t], skip_special_tokens=False) for t in c.token_ids]
            out.append(Job(j.index, j.prompt, j.max_tokens, j.api, list(c.token_ids), texts,
                           c.text))  # fmt: skip
    return out


class Client:
    """Both APIs of one `splitserve up`; make it inside the event loop that uses it."""

    def __init__(self, url: str, grpc_address: str, model: str = "tiny", timeout_s: float = 120):
        from protos.splitserve.v1 import generate_pb2_grpc

        self.url, self.model, self.timeout_s = url, model, timeout_s
        self.http = httpx.AsyncClient(timeout=timeout_s)
        self.channel = grpc.aio.insecure_channel(grpc_address)
        self.stub = generate_pb2_grpc.GenerateStub(self.channel)

    async def close(self) -> None:
        await self.http.aclose()
        await self.channel.close()

    async def run(self, job: Job, o: Outcome | None = None) -> Outcome:
        """The job's outcome (filled in as tokens arrive when o is given)."""
        o = o if o is not None else Outcome(job, time.monotonic())
        try:
            await asyncio.wait_for(
                self._http(job, o) if job.api == "http" else self._grpc(job, o), self.timeout_s
            )
        except TimeoutError:
            o.error = f"no answer within {self.timeout_s:g} s"
        except grpc.aio.AioRpcError as e:
            o.error = f"gRPC {e.code().name}: {e.details()}"
        except httpx.HTTPError as e:
            o.error = f"HTTP {type(e).__name__}: {e}"
        except (ValueError, KeyError, TypeError) as e:  # an answer of the wrong shape
            o.error = f"malformed answer: {type(e).__name__}: {e}"
        o.done_s = time.monotonic()
        if o.error is None and o.finish is None:
            o.error = "the stream ended without a finish reason"
        return o

    def _got(self, o: Outcome, tokens: list) -> None:
        if tokens and o.first_token_s is None:
            o.first_token_s = time.monotonic()
        o.tokens += tokens

    async def _http(self, job: Job, o: Outcome) -> None:
        body = {"model": self.model, "prompt": job.prompt, "max_tokens": job.max_tokens,
                "temperature": 0, "presence_penalty": PRESENCE_PENALTY, "ignore_eos": True,
                "stream": True, "logprobs": 0}  # fmt: skip
        async with self.http.stream("POST", self.url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                o.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')}"
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    o.error = f"error event: {chunk['error'].get('message')}"
                    continue
                for c in chunk["choices"]:
                    o.text += c["text"]
                    o.finish = c["finish_reason"] or o.finish
                    self._got(o, (c.get("logprobs") or {}).get("tokens", []))

    async def _grpc(self, job: Job, o: Outcome) -> None:
        from protos.splitserve.v1 import common_pb2, generate_pb2

        req = generate_pb2.GenerateRequest(
            model=self.model, prompt_token_ids=generate_pb2.TokenIds(ids=job.prompt),
            sampling=common_pb2.SamplingParams(
                max_tokens=job.max_tokens, temperature=0.0, presence_penalty=PRESENCE_PENALTY,
                ignore_eos=True),
        )  # fmt: skip
        async for msg in self.stub.Generate(req, timeout=self.timeout_s):
            o.text += msg.text
            o.finish = msg.finish_reason or o.finish
            self._got(o, list(msg.token_ids))

    async def probe(self) -> bool:
        """A fresh, short, non-streamed request: True when it is answered in full."""
        prompt = random.Random(time.monotonic_ns()).choices(range(*VOCAB), k=20)
        body = {"model": self.model, "prompt": prompt, "max_tokens": 4, "temperature": 0,
                "ignore_eos": True}  # fmt: skip
        try:
            r = await self.http.post(self.url + "/v1/completions", json=body)
        except httpx.HTTPError:
            return False
        return r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


class Load:
    """Jobs sent at a steady rate, each its own task; `outcomes` once `wait` returns."""

    def __init__(self, client: Client, jobs: Sequence[Job], rate: float) -> None:
        self.client, self.jobs, self.rate = client, list(jobs), rate
        self.running: list[Outcome] = []  # in flight, for the fault's trigger
        self.outcomes: list[Outcome] = []
        self._tasks: list[asyncio.Task] = []
        self._sender: asyncio.Task | None = None

    def start(self) -> None:
        self._sender = asyncio.create_task(self._send())

    async def _send(self) -> None:
        t0 = time.monotonic()
        for k, job in enumerate(self.jobs):
            await asyncio.sleep(max(0.0, t0 + k / self.rate - time.monotonic()))
            self._tasks.append(asyncio.create_task(self._one(job)))

    async def _one(self, job: Job) -> Outcome:
        o = Outcome(job, time.monotonic())
        self.running.append(o)
        try:
            await self.client.run(job, o)
        finally:
            self.running.remove(o)
        self.outcomes.append(o)
        return o

    @property
    def sent(self) -> int:
        return len(self._tasks)

    def finished(self) -> bool:
        """Every job sent and answered."""
        return len(self.outcomes) == len(self.jobs)

    def mid_stream(self, min_tokens: int) -> int:
        """Requests in flight with at least min_tokens delivered."""
        return sum(len(o.tokens) >= min_tokens for o in self.running)

    async def wait(self) -> list[Outcome]:
        assert self._sender is not None
        await self._sender
        await asyncio.gather(*self._tasks)
        return sorted(self.outcomes, key=lambda o: o.job.index)
