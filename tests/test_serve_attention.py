"""`splitserve serve attention` (a KV lender in the foreground) and `--borrow-kv` on the decode
and colocated commands: their flags, and real processes lending and borrowing through Redis."""

from __future__ import annotations

import asyncio
import queue
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
from typer.testing import CliRunner

from kvstore.lending import Ledger
from kvstore.registry import list_replicas
from splitserve.cli import app

WIDE = {"COLUMNS": "200", "NO_COLOR": "1"}


def _help(*args: str) -> str:
    res = CliRunner().invoke(app, [*args, "--help"], env=WIDE)
    assert res.exit_code == 0, res.output
    return res.output


def test_serve_attention_help_and_the_borrow_flag():
    out = _help("serve", "attention")
    flags = ["--model", "--port", "--redis", "--num-kv-blocks", "--kv-memory", "--lend-fraction",
             "--dtype", "--device", "--metrics-port", "--namespace"]  # fmt: skip
    for flag in flags:
        assert flag in out, flag
    assert "--borrow-kv" in _help("serve", "decode")
    assert "--borrow-kv" in _help("serve", "colocated")
    prefill = _help("serve", "prefill")
    assert "--borrow-kv" not in prefill  # it only hands KV off
    # ... and keeps every other option as declared (names and help).
    assert "--redis " in prefill and "Redis URL" in prefill and "--redis-url" not in prefill


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--num-kv-blocks", "64", "--kv-memory", "1GiB"], "both size the pool"),
        (["--lend-fraction", "1.5"], "lend_fraction must be within [0, 1]"),
        (["--kv-memory", "lots"], "--kv-memory: not a size"),
    ],
)
def test_serve_attention_refuses_bad_flags(args, message, tiny_model_dir):
    res = CliRunner().invoke(
        app, ["serve", "attention", "--model", str(tiny_model_dir), *args], env=WIDE
    )
    assert res.exit_code == 2 and message in res.output, res.output


class _Proc:
    """A `splitserve serve ...` process: its first stdout line (the address) within a bound,
    stderr kept; SIGTERM then a bounded wait on close."""

    def __init__(self, *args: str) -> None:
        cmd = [sys.executable, "-m", "splitserve.cli", "serve", *args]
        self.p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.stderr: list[str] = []
        threading.Thread(target=lambda: self.stderr.extend(self.p.stderr), daemon=True).start()
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: lines.put(self.p.stdout.readline()), daemon=True).start()
        try:
            self.address = lines.get(timeout=60).strip()
        except queue.Empty:
            self.address = ""
        if not self.address:
            self.kill()
            pytest.fail(f"{' '.join(args[:1])} did not come up: {''.join(self.stderr)[-3000:]}")

    def stop(self, timeout_s: float = 30) -> int:
        self.p.send_signal(signal.SIGTERM)
        try:
            return self.p.wait(timeout_s)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait(10)


def _health(address: str, service: str) -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as ch:
        return (
            health_pb2_grpc.HealthStub(ch)
            .Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            .status
        )


def _generate(address: str, prompt: list[int], params) -> list[int]:
    """A whole generation from a colocated server, through the router's client."""
    from router.pd_client import PDClient

    async def go() -> list[int]:
        async with PDClient(address) as c:
            tokens: list[int] = []
            async for piece in c.generate(prompt, params):
                tokens += piece.token_ids
            return tokens

    return asyncio.run(asyncio.wait_for(go(), 120))


def test_serve_attention_lends_to_a_borrowing_colocated_server(
    tiny_model_dir, redis_url, namespace
):
    """An attention process announces itself (ledger, registry, gRPC health SERVING); a
    colocated process with --borrow-kv and a pool too small for the prompt borrows from it and
    gives the tokens of one engine holding everything; on SIGTERM both leave cleanly."""
    from grpc_health.v1 import health_pb2

    from services.engine.sampling_params import SamplingParams
    from tests.engine_helpers import make_engine, random_prompts

    common = ["--model", str(tiny_model_dir), "--redis", redis_url, "--namespace", namespace]
    att = _Proc("attention", *common, "--num-kv-blocks", "64", "--lend-fraction", "0.5")
    dec = None
    ledger = Ledger(redis_url, namespace, 5.0)
    try:
        assert _health(att.address, "splitserve.v1.Attention") == (
            health_pb2.HealthCheckResponse.SERVING
        )
        [info] = ledger.creditors()
        assert (info.address, info.capacity, info.lend_cap, info.lent) == (att.address, 64, 32, 0)
        [rep] = list_replicas(redis_url, "attention", tiny_model_dir.name, ns=namespace)
        assert (rep.address, rep.total_blocks) == (att.address, 64)

        # 8 local blocks (128 tokens) for a 300-token prompt: the rest is borrowed.
        dec = _Proc("colocated", *common, "--num-kv-blocks", "8", "--borrow-kv")
        [prompt] = random_prompts(1, 256, 300, 300, seed=5)
        params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)

        got = _generate(dec.address, prompt, params)
        [want] = make_engine(tiny_model_dir).generate([prompt], params)
        assert got == want.token_ids
        assert dec.stop() == 0
        dec = None
        deadline = time.monotonic() + 20  # the borrower's stream ended: its blocks come back
        while ledger.creditors()[0].lent and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ledger.creditors()[0].lent == 0
        assert att.stop() == 0
        assert not ledger.creditors()  # withdrawn on the way out
        assert not list_replicas(redis_url, "attention", ns=namespace)
    finally:
        ledger.close()
        for p in (dec, att):
            if p is not None:
                p.kill()


def test_serve_offload_model_worker_over_an_attention_worker(tiny_model_dir, redis_url, namespace):
    """`serve attention --offload` and `serve colocated --offload-workers 1`: the model worker
    (no KV) finds the attention worker in the registry, answers with the colocated engine's
    tokens, and records where its KV heads live."""
    from services.engine.sampling_params import SamplingParams
    from services.offload_client import placements
    from tests.engine_helpers import make_engine, random_prompts

    assert "--offload-workers" in _help("serve", "colocated")
    assert "--offload-workers" not in _help("serve", "decode")
    assert "--offload" in _help("serve", "attention")
    common = ["--model", str(tiny_model_dir), "--redis", redis_url, "--namespace", namespace]
    att = _Proc("attention", *common, "--num-kv-blocks", "64", "--offload")
    dec = None
    try:
        [rep] = list_replicas(redis_url, "attention-offload", tiny_model_dir.name, ns=namespace)
        assert rep.address == att.address
        dec = _Proc("colocated", *common, "--num-kv-blocks", "32", "--offload-workers", "1")
        [prompt] = random_prompts(1, 256, 100, 100, seed=6)
        params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)

        got = _generate(dec.address, prompt, params)
        [want] = make_engine(tiny_model_dir).generate([prompt], params)
        assert got == want.token_ids
        [heads] = placements(redis_url, namespace).values()
        assert heads == {"0-2": att.address}
        assert dec.stop() == 0
        dec = None
        assert not placements(redis_url, namespace)  # forgotten on the way out
        assert att.stop() == 0
    finally:
        for p in (dec, att):
            if p is not None:
                p.kill()
