"""Prometheus /metrics of real prefill, decode and colocated servers, scraped over HTTP."""

from __future__ import annotations

import asyncio
import random
import time
import urllib.error
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from protos.splitserve.v1 import decode_pb2, decode_pb2_grpc
from router.pd_client import PDClient
from rpc.sampling import sampling_to_pb
from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.engine.sampling_params import SamplingParams
from services.metrics import TENANT_METADATA_KEY
from tests.replica_helpers import decode_server, prefill_server

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def engine(model_dir, **kw) -> LLMEngine:
    kw.setdefault("num_kv_blocks", 512)
    return LLMEngine(model_dir, EngineConfig(**kw), seed=0)


class Scrape:
    """One /metrics page: samples summed over whatever labels a lookup leaves open."""

    def __init__(self, address: str) -> None:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as r:
            text = r.read().decode()
        self.samples = [
            (s.name, s.labels, s.value)
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
        ]

    def __call__(self, name: str, **labels: str) -> float:
        found = [v for n, ls, v in self.samples
                 if n == name and all(ls.get(k) == v2 for k, v2 in labels.items())]  # fmt: skip
        assert found, f"no sample {name} {labels}"
        return sum(found)


def assert_pool_gauges(m: Scrape, server, loop_thread, role: str) -> None:
    free, total = loop_thread.run(server.loop.call(lambda e: (e.pool.num_free, e.pool.num_blocks)))
    assert m("splitserve:kv_blocks_free", role=role, model="tiny") == free
    assert m("splitserve:kv_blocks_total", role=role) == total
    assert m("splitserve:kv_blocks_used", role=role) == total - free == 0  # idle: nothing held
    assert m("splitserve:num_requests_running", role=role) == 0
    assert m("splitserve:num_requests_waiting", role=role) == 0
    assert m("splitserve:engine_steps_total", role=role) == server.loop.steps > 0
    assert m("splitserve:engine_step_seconds_total", role=role) == server.loop.step_seconds > 0
    tokens = server.loop.engine.scheduler.tokens_scheduled
    assert m("splitserve:engine_step_tokens_total", role=role) == tokens >= server.loop.steps


def test_colocated_metrics(tiny_model_dir, loop_thread):
    # 8 blocks of 16 tokens: three 60-token requests at once must preempt.
    d = decode_server(tiny_model_dir, engine={"num_kv_blocks": 8}, colocated=True, metrics_port=0)
    loop_thread.run(d.start())
    addr = d.metrics_address
    try:
        assert addr and addr.startswith("127.0.0.1:")
        m0 = Scrape(addr)  # series exist before any request
        assert m0("splitserve:generation_tokens_total", role="colocated", tenant="") == 0
        assert m0("splitserve:time_to_first_token_seconds_count", role="colocated") == 0

        rng = random.Random(5)
        batch = [[rng.randrange(5, 2000) for _ in range(20)] for _ in range(3)]
        p1 = [rng.randrange(5, 2000) for _ in range(40)]
        p2 = p1 + [rng.randrange(5, 2000) for _ in range(10)]  # shares p1's two full blocks
        long = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
        short = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)

        async def go():
            async with PDClient(d.address) as c:
                outs = list(await asyncio.gather(*(c.complete(x, long) for x in batch)))
                outs.append(await c.complete(p1, short))
                outs.append(await c.complete(p2, short))
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await c.complete([5, 10**6], short)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            async with grpc.aio.insecure_channel(d.address) as ch:
                req = decode_pb2.DecodeRequest(prompt_token_ids=[7, 8, 9, 10],
                                               sampling=sampling_to_pb(short))  # fmt: skip
                n = 0
                async for msg in decode_pb2_grpc.DecodeStub(ch).Decode(
                    req, metadata=((TENANT_METADATA_KEY, "acme"),)
                ):
                    n += len(msg.token_ids)
            return outs, n

        outs, acme_tokens = asyncio.run(go())
        assert acme_tokens == 8
        prompts = [*batch, p1, p2]
        m = Scrape(addr)
        lab = {"role": "colocated", "model": "tiny"}
        assert m("splitserve:requests_total", **lab, tenant="", status="length") == 5
        assert m("splitserve:requests_total", **lab, tenant="acme", status="length") == 1
        assert m("splitserve:requests_total", **lab, status="invalid_argument") == 1
        assert m("splitserve:requests_total", **lab) == 7
        gen = sum(len(o.token_ids) for o in outs)
        assert m("splitserve:generation_tokens_total", **lab, tenant="") == gen == 3 * 40 + 2 * 8
        assert m("splitserve:generation_tokens_total", **lab, tenant="acme") == 8
        assert m("splitserve:prompt_tokens_total", **lab, tenant="") == sum(map(len, prompts))
        assert m("splitserve:prompt_tokens_total", **lab, tenant="acme") == 4
        cached = sum(o.usage.cached_tokens for o in outs)
        assert cached >= 32  # p2 found p1's blocks
        assert m("splitserve:prompt_tokens_cached_total", **lab, tenant="") == cached
        for h in ("time_to_first_token", "e2e_request_latency", "request_queue_time",
                  "time_per_output_token"):  # fmt: skip
            assert m(f"splitserve:{h}_seconds_count", **lab) == 6, h
            assert m(f"splitserve:{h}_seconds_bucket", **lab, le="+Inf") == 6, h
        assert m("splitserve:time_to_first_token_seconds_sum", **lab) > 0
        assert m("splitserve:inter_token_latency_seconds_count", **lab) == gen - 5 + 8 - 1
        preempted = d.engine.scheduler.num_preemptions
        assert preempted > 0 and m("splitserve:num_preemptions_total", **lab) == preempted
        assert_pool_gauges(m, d, loop_thread, "colocated")
        assert m("splitserve:kv_transfer_bytes_total", **lab, direction="pull") == 0

        # A client that leaves mid-stream is counted as cancelled.
        async def cancel():
            async with PDClient(d.address) as c:
                gen = c.generate([5, 6, 7], SamplingParams(max_tokens=100, ignore_eos=True))
                async for _ in gen:
                    break
                await gen.aclose()

        asyncio.run(cancel())
        deadline = time.monotonic() + 30  # a bound, not a measure: it ends once counted
        while time.monotonic() < deadline:
            m = Scrape(addr)
            if [v for n, ls, v in m.samples if ls.get("status") == "cancelled"]:
                break
            time.sleep(0.05)
        assert m("splitserve:requests_total", **lab, status="cancelled") == 1
        assert m("splitserve:e2e_request_latency_seconds_count", **lab) == 6  # completed only
    finally:
        loop_thread.run(d.stop(drain_s=2))
    with pytest.raises(urllib.error.URLError):  # the endpoint stops with the server
        Scrape(addr)


def test_disaggregated_metrics(tiny_model_dir, redis_url, namespace, loop_thread):
    p = prefill_server(tiny_model_dir, redis_url, namespace, metrics_port=0)
    d = decode_server(tiny_model_dir, redis_url, namespace, metrics_port=0)
    loop_thread.run(p.start())
    loop_thread.run(d.start())
    try:
        assert p.metrics_address != d.metrics_address  # each server its own endpoint, registry
        rng = random.Random(3)
        first = [rng.randrange(5, 2000) for _ in range(64)]  # 4 full blocks
        second = first + [rng.randrange(5, 2000) for _ in range(40)]

        async def go():
            async with PDClient(d.address, p.address, model="tiny") as c:
                return [await c.complete(first, GREEDY), await c.complete(second, GREEDY)]

        outs = asyncio.run(go())
        mp, md = Scrape(p.metrics_address), Scrape(d.metrics_address)
        pl, dl = {"role": "prefill", "model": "tiny"}, {"role": "decode", "model": "tiny"}

        assert mp("splitserve:requests_total", **pl, tenant="", status="handoff") == 2
        assert md("splitserve:requests_total", **dl, tenant="", status="length") == 2
        assert mp("splitserve:requests_total", **pl) == md("splitserve:requests_total", **dl) == 2
        # Prefill made each first token, decode the rest: together, every token once.
        assert mp("splitserve:generation_tokens_total", **pl) == 2
        assert md("splitserve:generation_tokens_total", **dl) == 2 * 23
        assert sum(len(o.token_ids) for o in outs) == 2 * 24
        for m, lab in ((mp, pl), (md, dl)):
            assert m("splitserve:prompt_tokens_total", **lab) == len(first) + len(second)
            assert m("splitserve:time_to_first_token_seconds_count", **lab) == 2
            assert m("splitserve:e2e_request_latency_seconds_count", **lab) == 2
        assert mp("splitserve:time_per_output_token_seconds_count", **pl) == 0  # one token each
        assert md("splitserve:time_per_output_token_seconds_count", **dl) == 2
        assert md("splitserve:inter_token_latency_seconds_count", **dl) == 2 * 22
        # Both engines found the first request's 4 blocks in their prefix cache for the second.
        assert mp("splitserve:prompt_tokens_cached_total", **pl) == 64
        dec_cached = sum(o.usage.cached_tokens for o in outs)
        assert md("splitserve:prompt_tokens_cached_total", **dl) == dec_cached == 64

        # KV transfer: what decode's timings reported; prefill published exactly those bytes.
        tm = [o.decode_timings for o in outs]
        pulled = sum(t.bytes_pulled for t in tm)
        assert pulled > 0
        assert md("splitserve:kv_transfer_bytes_total", **dl, direction="pull") == pulled
        assert md("splitserve:kv_transfer_blocks_total", **dl) == sum(t.blocks_pulled for t in tm)
        assert md("splitserve:kv_recomputed_blocks_total", **dl) == sum(
            t.blocks_recomputed for t in tm
        )
        assert md("splitserve:kv_transfer_seconds_total", **dl) == pytest.approx(
            sum(t.transfer_ms for t in tm) / 1e3
        )
        assert mp("splitserve:kv_transfer_bytes_total", **pl, direction="publish") == pulled
        assert mp("splitserve:kv_transfer_seconds_total", **pl) == pytest.approx(
            sum(o.prefill_timings.publish_ms for o in outs) / 1e3
        )
        assert_pool_gauges(mp, p, loop_thread, "prefill")
        assert_pool_gauges(md, d, loop_thread, "decode")
        assert md("splitserve:num_preemptions_total", **dl) == 0
    finally:
        loop_thread.run(d.stop(drain_s=2))
        loop_thread.run(p.stop(drain_s=2))
    assert p.metrics.address and d.metrics.address
    for addr in (p.metrics_address, d.metrics_address):
        with pytest.raises(urllib.error.URLError):
            Scrape(addr)
