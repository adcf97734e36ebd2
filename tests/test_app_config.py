"""The application YAML: defaults, per-role settings, and errors that name the field."""

from __future__ import annotations

from pathlib import Path

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
        ([{"name": "a", "path": "p", "decode": {"gpu_memory_utilization": 0}}],
         "models.0.decode.gpu_memory_utilization: Input should be greater than 0"),
        ([{"name": "a", "path": "p", "engine": {"load_format": "npz"}}],
         "models.0.engine.load_format: Input should be 'auto', 'gguf' or 'dummy'"),
        ([{"name": "a", "path": "p", "engine": {"kv_cache_memory": "much"}}],
         "models.0.engine.kv_cache_memory: not a size: 'much'"),
        ([{"name": "a", "path": "p", "prefill": {"max_num_batched_tokens": 0}}],
         "models.0.prefill.max_num_batched_tokens: Input should be greater than or equal to 1"),
        ([{"name": "a", "path": "p", "prefil": {}}], "models.0.prefil: Extra inputs"),
        # Decoders lending their own free blocks: a share of the pool; prefill lends none.
        ([{"name": "a", "path": "p", "colocated": {"lend_fraction": 2}}],
         "models.0.colocated.lend_fraction: Input should be less than or equal to 1"),
        ([{"name": "a", "path": "p", "mode": "disaggregated", "prefill": {"lend_fraction": 0.5}}],
         "models.0: prefill.lend_fraction: only decode and colocated replicas lend KV"),
        # Attention replicas: their pool and what of it may be lent.
        ([{"name": "a", "path": "p", "attention": {"lend_fraction": 1.5}}],
         "models.0.attention.lend_fraction: Input should be less than or equal to 1"),
        ([{"name": "a", "path": "p", "attention": {"lend_fraction": -0.1}}],
         "models.0.attention.lend_fraction: Input should be greater than or equal to 0"),
        ([{"name": "a", "path": "p", "attention": {"num_kv_blocks": 1}}],
         "models.0.attention.num_kv_blocks: Input should be greater than or equal to 2"),
        ([{"name": "a", "path": "p", "attention": {"kv_memory": "lots"}}],
         "models.0.attention.kv_memory: not a size: 'lots'"),
        ([{"name": "a", "path": "p", "attention": {"num_kv_blocks": 64, "kv_memory": "1GiB"}}],
         "models.0.attention.num_kv_blocks: num_kv_blocks and kv_memory both size the pool"),
        ([{"name": "a", "path": "p", "attention": {"replicas": 0}}],
         "models.0.attention.replicas: Input should be greater than or equal to 1"),
        ([{"name": "a", "path": "p", "attention": {"max_waiting": 3}}],
         "models.0.attention.max_waiting: Extra inputs"),
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
    from services.engine.block_hash import model_fingerprint
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


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("mode", ["disaggregated", "colocated"])
def test_attention_replicas_make_the_decoders_borrow(mode, tiny_model_dir):
    """An `attention:` side adds attention replicas to the model's pool (their own pool size
    over the engine's, their lend fraction) and turns borrow_kv on for its decoders."""
    from services.config import AttentionConfig, DecodeConfig
    from splitserve.deployment import plan_deployment

    model = {"name": "m", "path": "p", "mode": mode, "engine": {"num_kv_blocks": 24}}
    plain = plan_deployment(parse_config({"models": [model]}), "redis://r:6379/0",
                            {"m": tiny_model_dir})  # fmt: skip
    assert all(r.role != "attention" for r in plain.replicas)
    assert not any(getattr(r.config, "borrow_kv", False) for r in plain.replicas)

    side = {"replicas": 2, "num_kv_blocks": 256, "lend_fraction": 0.75, "num_cpus": 0.5}
    cfg = parse_config({"models": [{**model, "attention": side}]})
    assert cfg.models[0].roles[-1] == "attention"
    plan = plan_deployment(cfg, "redis://r:6379/0", {"m": tiny_model_dir})
    by_role = {r.role: r for r in plan.replicas}
    serving = ["prefill", "decode"] if mode == "disaggregated" else ["colocated"]
    assert list(by_role) == [*serving, "attention"]
    att = by_role["attention"]
    assert att.name == "attention-m" and (att.spec.replicas, att.spec.num_cpus) == (2, 0.5)
    assert isinstance(att.config, AttentionConfig) and att.config.role == "attention"
    assert (att.config.engine.num_kv_blocks, att.config.lend_fraction) == (256, 0.75)
    assert att.config.cluster.redis_url == "redis://r:6379/0"
    dec = by_role[serving[-1]].config
    assert isinstance(dec, DecodeConfig) and dec.borrow_kv and dec.engine.num_kv_blocks == 24
    # The KV layout must match the decoders': same block size and dtype.
    assert (att.config.engine.block_size, att.config.engine.dtype) == (
        dec.engine.block_size, dec.engine.dtype
    )  # fmt: skip
    # Decoders that lend to each other also borrow from each other, without attention replicas.
    serving_side = serving[-1]
    lending = {**model, serving_side: {"replicas": 2, "lend_fraction": 0.5}}
    dec = plan_deployment(parse_config({"models": [lending]}), "redis://r:6379/0",
                          {"m": tiny_model_dir}).replicas[-1].config  # fmt: skip
    assert isinstance(dec, DecodeConfig) and dec.borrow_kv and dec.lend_fraction == 0.5
    # kv_memory sizes the pool by bytes instead of the engine's block count.
    cfg = parse_config({"models": [{**model, "attention": {"kv_memory": "64MiB"}}]})
    att = plan_deployment(cfg, "redis://r:6379/0", {"m": tiny_model_dir}).replicas[-1].config
    assert (att.engine.num_kv_blocks, att.engine.kv_cache_memory_bytes) == (None, 64 << 20)


def test_the_long_context_example_loads_and_plans(tiny_model_dir):
    """examples/long-context.yaml: one colocated replica with a small pool that borrows from
    two attention replicas holding several times more."""
    from services.config import AttentionConfig, DecodeConfig
    from splitserve.deployment import plan_deployment

    cfg = load_config(EXAMPLES / "long-context.yaml")
    [m] = cfg.models
    assert (m.name, m.path, m.dtype, m.mode) == (
        "smollm2-135m-instruct", "smollm2-135m-instruct", "float32", "colocated"
    )  # fmt: skip
    plan = plan_deployment(cfg, "redis://r:6379/0", {m.name: tiny_model_dir})
    assert [(r.role, r.spec.replicas) for r in plan.replicas] == [("colocated", 1),
                                                                   ("attention", 2)]  # fmt: skip
    col, att = (r.config for r in plan.replicas)
    assert isinstance(col, DecodeConfig) and col.colocated and col.borrow_kv
    assert isinstance(att, AttentionConfig)
    bs = col.engine.block_size
    local = col.engine.num_kv_blocks * bs
    lent = 2 * att.engine.num_kv_blocks * att.lend_fraction * bs
    assert local < 500 and local + lent >= 4 * 1500  # a 1,500-token prompt: 4x the local pool


def test_attention_roles_run_as_attention_replicas(tiny_model_dir):
    """The Serve application runs an AttentionReplica (no engine) for the attention role and
    an EngineReplica for the others (read through Ray's bound graph, a private attribute)."""
    from splitserve.app import build_application

    cfg = load_config(EXAMPLES / "long-context.yaml")
    app = build_application(cfg, "redis://r:6379/0", {cfg.models[0].name: tiny_model_dir})
    workers = [w._bound_deployment for w in app._bound_deployment.init_args[1:]]
    got = [(w.name, w.func_or_class.__name__, w.num_replicas, type(w.init_args[0]).__name__)
           for w in workers]  # fmt: skip
    assert got == [
        ("colocated-smollm2-135m-instruct", "EngineReplica", 1, "DecodeConfig"),
        ("attention-smollm2-135m-instruct", "AttentionReplica", 2, "AttentionConfig"),
    ]


def test_the_one_gpu_examples_give_each_replica_its_own_memory_share(tiny_model_dir):
    """examples/gpu-llama8b.yaml: prefill and decode share one GPU (half each by Ray's count),
    each engine sized from its own share; the colocated one takes most of the card. Both draw
    the preset's weights at random (no checkpoint)."""
    from splitserve.deployment import plan_deployment

    pd = load_config(EXAMPLES / "gpu-llama8b.yaml")
    plan = plan_deployment(pd, "redis://r:6379/0", {"llama-8b": tiny_model_dir})
    got = {r.role: (r.spec.num_gpus, r.config.engine.device,
                    r.config.engine.gpu_memory_utilization, r.config.engine.load_format,
                    r.config.engine.max_num_batched_tokens) for r in plan.replicas}  # fmt: skip
    assert got == {"prefill": (0.5, "cuda", 0.3, "dummy", 8192),
                   "decode": (0.5, "cuda", 0.55, "dummy", 2048)}  # fmt: skip
    assert sum(v[2] for v in got.values()) <= 0.9  # room for two CUDA contexts and the pool
    [col] = load_config(EXAMPLES / "gpu-llama8b-colocated.yaml").models
    ecfg = col.engine_config("colocated", device="cuda")
    assert (col.colocated.num_gpus, ecfg.gpu_memory_utilization) == (1, 0.85)
    # Unset on a role: the engine section's (its default 0.9).
    m = parse_config({"models": [{"name": "a", "path": "p"}]}).models[0]
    assert m.engine_config("decode", device="cuda").gpu_memory_utilization == 0.9


def test_kv_budget_is_the_engines_own_share_within_free_memory():
    from services.engine.gpu_memory import kv_budget

    gib = 1 << 30
    # Alone on a 140 GiB card with 16 GiB of weights: 0.9 of the card less its weights.
    assert kv_budget(140 * gib, 123 * gib, 16 * gib, 0.9) == pytest.approx(110 * gib)
    # A decode at 0.55 sizing after a prefill took its 0.3 (42 GiB): the other's memory does
    # not count against its share...
    assert kv_budget(140 * gib, 81 * gib, 16 * gib, 0.55) == pytest.approx(61 * gib)
    # ...but the card's free memory (less a 2% margin) bounds it.
    assert kv_budget(140 * gib, 40 * gib, 16 * gib, 0.55) == pytest.approx(37.2 * gib)


def test_a_preset_with_random_weights_is_written_without_a_checkpoint(tmp_path, monkeypatch):
    from splitserve.up import resolve_model_path

    monkeypatch.setenv("SPLITSERVE_HOME", str(tmp_path))
    spec = parse_config(
        {"models": [{"name": "t", "path": "tiny", "engine": {"load_format": "dummy"}}]}
    ).models[0]
    d = resolve_model_path(spec)
    assert d.name == "preset-tiny-shapes" and (d / "config.json").exists()
    assert (d / "tokenizer.json").exists() and not list(d.glob("*.safetensors"))


@pytest.mark.parametrize(
    ("threads", "lone", "want"),
    [(4, None, 3), (2, None, 1), (1, None, 0), (4, 2, 2), (4, 0, 0), (4, 4, 0), (4, 9, 0)],
)
def test_cpu_replicas_run_a_lone_sequence_on_a_core_less(threads, lone, want, tiny_model_dir):
    """A CPU role's one-row steps get threads less one by default with 4-bit weights
    (lone_threads: the operator's count; 0, or as many as threads: the same threads as every
    step); float32 weights the same threads unless asked; a GPU role's none."""
    from splitserve.deployment import plan_deployment

    side = {"threads": threads} | ({} if lone is None else {"lone_threads": lone})
    model = {"name": "m", "path": "tiny", "mode": "colocated", "colocated": side,
             "engine": {"load_format": "gguf"}}  # fmt: skip
    plan = plan_deployment(parse_config({"models": [model]}), "redis://r:6379/0",
                           {"m": tiny_model_dir})  # fmt: skip
    cfg = plan.replicas[0].config
    assert (cfg.cpu_threads, cfg.engine.cpu_lone_step_threads) == (threads, want)
    gpu = {"name": "m", "path": "tiny", "mode": "colocated", "colocated": {"num_gpus": 1}}
    plan = plan_deployment(parse_config({"models": [gpu]}), "redis://r:6379/0",
                           {"m": tiny_model_dir})  # fmt: skip
    assert plan.replicas[0].config.engine.cpu_lone_step_threads == 0
    dense = model | {"engine": {}}  # float32 weights: the same threads unless asked
    plan = plan_deployment(parse_config({"models": [dense]}), "redis://r:6379/0",
                           {"m": tiny_model_dir})  # fmt: skip
    assert plan.replicas[0].config.engine.cpu_lone_step_threads == (want if lone else 0)
    with pytest.raises(ConfigError, match="lone_threads"):
        parse_config({"models": [model | {"colocated": {"lone_threads": -1}}]})
