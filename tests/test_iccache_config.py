"""The app config's iccache section: the shipped example loads and plans (routes for the
router, an embedding replica in the Serve application), and bad sections are refused naming
the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from router.config import ModelRoute, RouterConfig
from router.iccache.config import ICCacheConfig, ICRoute
from splitserve.app_config import ConfigError, load_config, parse_config

ROUTES = {"routes": [{"name": "auto", "small": "a", "large": "b"}]}
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "iccache.yaml"


def test_the_iccache_example_plans_routes_and_an_embed_replica(tiny_model_dir, qwen2_model_dir,
                                                                tmp_path):  # fmt: skip
    from splitserve.app import build_application
    from splitserve.deployment import plan_deployment

    cfg = load_config(EXAMPLE)
    small, large = (m.name for m in cfg.models)
    dirs = {small: tiny_model_dir, large: qwen2_model_dir}
    embed_dir = tmp_path / "minilm"  # only its width is read when planning
    embed_dir.mkdir()
    (embed_dir / "config.json").write_text('{"hidden_size": 384}')
    plan = plan_deployment(cfg, "redis://r:6379/0", dirs, embed_dir=embed_dir)
    ic = plan.router.iccache
    assert ic is not None and ic.embed_dim == 384 and ic.embed_address is None
    assert [(r.name, r.small, r.large, r.tenants) for r in ic.routes] == [
        ("auto", "smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct", ())
    ]
    assert ic.capacity_bytes == 20 << 20 and ic.embed_model == "all-minilm-l6-v2"
    assert plan.embed is not None and plan.embed.name == "all-minilm-l6-v2"
    assert plan.embed.cluster.redis_url == "redis://r:6379/0"

    app = build_application(cfg, "redis://r:6379/0", dirs, embed_dir)
    workers = [w._bound_deployment for w in app._bound_deployment.init_args[1:]]
    assert [(w.name, w.func_or_class.__name__) for w in workers] == [
        (f"colocated-{small}", "EngineReplica"), (f"colocated-{large}", "EngineReplica"),
        ("embed", "EmbedReplica"),
    ]  # fmt: skip

    # Without the embedding model's directory there is nothing to deploy: said so.
    with pytest.raises(ValueError, match="embedding model"):
        plan_deployment(cfg, "redis://r:6379/0", dirs)


@pytest.mark.parametrize(
    "section, field",
    [
        ({"routes": [{"name": "auto", "small": "nope", "large": "b"}]}, "iccache.routes.0.small"),
        ({"routes": [{"name": "c", "small": "a", "large": "b"}]}, "iccache.routes.0.name"),
        ({"routes": [{"name": "auto", "small": "a", "large": "a"}]}, "small and large"),
        ({"routes": []}, "iccache.routes"),
        ({**ROUTES, "min_similarity": 2}, "iccache.min_similarity"),
        ({**ROUTES, "capacity": "lots"}, "iccache.capacity"),
        ({**ROUTES, "bandit": "greedy"}, "iccache.bandit"),
        ({**ROUTES, "embed": {"gpus": 1}}, "iccache.embed.gpus"),
    ],
)
def test_bad_iccache_sections_name_the_field(section, field):
    models = [{"name": n, "path": "tiny"} for n in "abc"]
    data = {"models": models, "iccache": section}
    with pytest.raises(ConfigError) as e:
        parse_config(data)
    assert field in str(e.value)


def test_a_good_section_sets_the_routers_knobs():
    data = yaml.safe_load(EXAMPLE.read_text())
    data["iccache"].update(shared_tenants=["team-a"], alpha=0.1, arm_priors=[0.6, 0.2, 0.8],
                           feedback_ttl_s=60, max_examples=2)  # fmt: skip
    data["iccache"]["routes"][0]["tenants"] = ["team-a", "team-b"]
    ic = parse_config(data).iccache.config(embed_dim=768)
    assert (ic.shared_tenants, ic.alpha, ic.arm_priors, ic.feedback_ttl_s, ic.max_examples,
            ic.embed_dim) == (("team-a",), 0.1, (0.6, 0.2, 0.8), 60, 2, 768)  # fmt: skip
    assert ic.routes[0].allows("team-b") and not ic.routes[0].allows("team-c")


def test_router_config_refuses_a_route_over_models_it_does_not_serve():
    m = ModelRoute(name="a", model_dir="/m", model_id="x", block_size=16, max_model_len=64)
    ic = ICCacheConfig(routes=(ICRoute(name="auto", small="a", large="b"),))
    with pytest.raises(ValueError, match="IC-Cache route 'auto'"):
        RouterConfig(models=(m,), cluster=_cluster(), iccache=ic)


def _cluster():
    from kvstore.config import Membership

    return Membership(redis_url="redis://r:6379/0")
