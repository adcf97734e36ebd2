"""The router while the cluster's Redis is down: /health says what is true (degraded while the
replicas it last saw still serve, 503 with the reason when it knows none), requests are
served or get a clear 503 (never a 500), and everything is back once Redis is."""

from __future__ import annotations

import random
import time

import httpx2
import pytest

from kvstore.config import Membership
from kvstore.registry import list_replicas
from router.app import build_app
from router.backend import PoolBackend
from router.config import ModelRoute, RouterConfig
from services.engine.tokenizer import load_tokenizer
from tests.kv_helpers import wait_for
from tests.replica_helpers import decode_server, prefill_server
from tests.router_helpers import serve


@pytest.fixture
def pools(tiny_model_dir, fresh_redis, loop_thread):
    pre = prefill_server(tiny_model_dir, fresh_redis.url, "outage", replica_id="prefill-0")
    dec = decode_server(tiny_model_dir, fresh_redis.url, "outage", replica_id="decode-0")
    loop_thread.run(pre.start())
    loop_thread.run(dec.start())
    wait_for(lambda: list_replicas(fresh_redis.url, "prefill", "tiny", "outage"), 30)
    wait_for(lambda: list_replicas(fresh_redis.url, "decode", "tiny", "outage"), 30)
    e = pre.engine
    config = RouterConfig(
        models=(
            ModelRoute(name="tiny", model_dir=str(tiny_model_dir), model_id=e.model_id,
                       block_size=e.block_size, max_model_len=e.max_model_len),
        ),
        cluster=Membership(redis_url=fresh_redis.url, namespace="outage"),
        auth=False,
        refresh_s=0.05,
    )  # fmt: skip
    yield config, load_tokenizer(tiny_model_dir)
    loop_thread.run(pre.stop(drain_s=1))
    loop_thread.run(dec.stop(drain_s=1))


def complete(url: str, seed: int) -> httpx2.Response:
    prompt = random.Random(seed).choices(range(5, 500), k=40)
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 3, "temperature": 0}
    return httpx2.post(f"{url}/v1/completions", json=body, timeout=60)


def test_health_and_requests_through_a_redis_outage(pools, fresh_redis):
    config, tok = pools
    with (
        serve(build_app(PoolBackend(config), {"tiny": tok}, None)) as warm,
        serve(build_app(PoolBackend(config), {"tiny": tok}, None)) as cold,
    ):
        assert httpx2.get(f"{warm}/health").json() == {"status": "ok"}
        before = complete(warm, 1)
        assert before.status_code == 200, before.text

        fresh_redis.stop()
        # The warm router saw the replicas: it still serves (a decode replica recomputes what
        # it cannot locate), and says it is degraded and why.
        h = httpx2.get(f"{warm}/health")
        assert h.status_code == 200 and h.json()["status"] == "degraded", h.text
        assert "unreachable" in h.json()["reason"]
        r = complete(warm, 1)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == before.json()["choices"][0]["text"]
        # The cold router never saw a replica: not ready, and a completion gets a clear 503.
        h = httpx2.get(f"{cold}/health")
        assert h.status_code == 503 and h.headers["retry-after"] == "1", h.text
        assert h.json()["status"] == "unavailable" and "Redis" in h.json()["reason"]
        r = complete(cold, 2)
        assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
        assert "Redis is unreachable" in r.json()["error"]["message"]

        fresh_redis.start()  # empty, as after a crash: the replicas re-register
        deadline = time.monotonic() + 30
        while httpx2.get(f"{cold}/health").status_code != 200:
            assert time.monotonic() < deadline, "not ready 30 s after Redis came back"
            time.sleep(0.1)
        for url in (warm, cold):
            assert httpx2.get(f"{url}/health").json() == {"status": "ok"}
            r = complete(url, 3)
            assert r.status_code == 200, r.text
