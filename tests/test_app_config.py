"""The application YAML: defaults, per-role settings, and errors that name the field."""

from __future__ import annotations

import pytest

from splitserve.app_config import ConfigError, load_config, parse_config

DOC = """
redis: redis://10.0.0.5:6379/0
http: {host: 0.0.0.0, port: 8080}
models:
  - name: llama
    path: /models/llama-8b
    dtype: bfloat16
    prefill: {replicas: 2, num_gpus: 1, device_pool: 4GiB, max_num_batched_tokens: 8192}
    decode: {replicas: 1, num_gpus: 1}
    engine: {max_num_seqs: 128, max_num_batched_tokens: 2048}
"""


def test_a_full_config_reads_back(tmp_path):
    f = tmp_path / "app.yaml"
    f.write_text(DOC)
    c = load_config(f)
    m = c.models[0]
    assert (c.redis, c.http.port, c.grpc.port, c.auth.enabled) == (
        "redis://10.0.0.5:6379/0", 8080, 50051, True
    )  # fmt: skip
    assert (m.mode, m.prefill.replicas, m.prefill.device_pool) == ("disaggregated", 2, "4GiB")
    # The prefill role takes whole prompts a step; decode keeps the engine's budget.
    assert (m.prefill.max_num_batched_tokens, m.decode.max_num_batched_tokens) == (8192, None)
    assert m.engine.max_num_batched_tokens == 2048
    assert (m.decode.device_pool, m.prefill.kv_memory) == ("2GiB", "1GiB")  # defaults


@pytest.mark.parametrize(
    ("models", "message"),
    [
        ([{"name": "a", "path": "p", "prefill": {"replicas": 0}}],
         "models.0.prefill.replicas: Input should be greater than or equal to 1"),
        ([{"name": "a", "path": "p", "prefill": {"device_pool": "lots"}}],
         "models.0.prefill.device_pool: not a size: 'lots'"),
        ([{"name": "a", "path": "p", "decode": {"kv_memory": "-1"}}],
         "models.0.decode.kv_memory: not a size"),
        # Engine fields follow the engine's own rules (one rule per field), checked at load.
        ([{"name": "a", "path": "p", "engine": {"block_size": 24}}],
         "models.0.engine.block_size: block_size must be a positive power of two, got 24"),
        ([{"name": "a", "path": "p", "engine": {"max_num_seqs": 0}}],
         "models.0.engine.max_num_seqs: max_num_seqs must be positive, got 0"),
        ([{"name": "a", "path": "p", "engine": {"gpu_memory_utilization": 1.5}}],
         "models.0.engine.gpu_memory_utilization: gpu_memory_utilization must be in (0, 1]"),
        ([{"name": "a", "path": "p", "engine": {"kv_cache_memory": "much"}}],
         "models.0.engine.kv_cache_memory: not a size: 'much'"),
        ([{"name": "a", "path": "p", "prefill": {"max_num_batched_tokens": 0}}],
         "models.0.prefill.max_num_batched_tokens: Input should be greater than or equal to 1"),
        ([{"name": "a", "path": "p", "prefil": {}}], "models.0.prefil: Extra inputs"),
        ([{"name": "a", "path": "p"}, {"name": "a", "path": "q"}], "duplicate model names"),
        ([], "models: List should have at least 1 item"),
    ],
)  # fmt: skip
def test_bad_configs_name_the_field(models, message):
    with pytest.raises(ConfigError, match="invalid config: ") as ei:
        parse_config({"models": models})
    assert message in str(ei.value)


def test_unreadable_or_non_mapping_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    f = tmp_path / "list.yaml"
    f.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(f)
    f.write_text("models: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(f)


def test_gpu_replicas_pick_their_own_gpu():
    from splitserve.app import gpu_device

    # Ray told to leave CUDA_VISIBLE_DEVICES alone: the replica's GPU by its node index.
    assert gpu_device([3], None) == "cuda:3"
    assert gpu_device(["1"], None) == "cuda:1"
    # Ray's default: the assigned GPU is the only one visible; or a restricted list.
    assert gpu_device([3], "3") == "cuda:0"
    assert gpu_device(["5"], "4,5,6") == "cuda:1"
    assert gpu_device([], None) == "cuda"
    assert gpu_device([7], "0,1") == "cuda"  # not visible here: let CUDA pick


def test_the_deployment_is_typed_configs_built_once(tmp_path, tiny_model_dir):
    """What each server runs comes from the app config as frozen configs: the router's routes,
    and per role a Prefill/DecodeConfig holding its EngineConfig (the role's step budget over
    the model's, the GPU a replica will narrow)."""
    import dataclasses

    from services.config import DecodeConfig, PrefillConfig
    from services.engine.engine import model_fingerprint
    from splitserve.deployment import plan_deployment

    f = tmp_path / "app.yaml"
    f.write_text(
        DOC.replace(
            "max_num_batched_tokens: 2048}", "max_num_batched_tokens: 2048, block_size: 32}"
        )
    )
    cfg = load_config(f)
    plan = plan_deployment(cfg, "redis://r:6379/0", {"llama": tiny_model_dir}, "0.0.0.0")
    pre, dec = (r.config for r in plan.replicas)
    assert [r.name for r in plan.replicas] == ["prefill-llama", "decode-llama"]
    assert isinstance(pre, PrefillConfig) and isinstance(dec, DecodeConfig)
    assert (pre.engine.max_num_batched_tokens, dec.engine.max_num_batched_tokens) == (8192, 2048)
    assert pre.engine.block_size == dec.engine.block_size == 32
    assert (pre.engine.dtype, pre.engine.device, pre.host) == ("bfloat16", "cuda", "0.0.0.0")
    assert pre.device_pool_bytes == 4 << 30 and pre.kv_memory_bytes == 1 << 30
    assert pre.cluster.redis_url == plan.router.cluster.redis_url == "redis://r:6379/0"
    [route] = plan.router.models
    assert (route.name, route.block_size, route.mode) == ("llama", 32, "disaggregated")
    assert route.model_id == model_fingerprint(tiny_model_dir)
    with pytest.raises(dataclasses.FrozenInstanceError):
        pre.max_waiting = 3  # type: ignore[misc]
