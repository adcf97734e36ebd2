"""The Serve application as a RayService (KubeRay) starts it: an application builder that Ray
Serve imports from `serveConfigV2` (`import_path: splitserve.serve_entry:build`) with the app
config, the same schema as `splitserve up --config`, inline in `args.config`.

The Helm chart (deploy/helm/splitserve) writes that config from its values: the Redis URL of
its valkey StatefulSet (or an external one), 0.0.0.0 hosts, the tenants file of its Secret. A
model's path is a directory of the model volume (a PVC, a host path, or filled by an init
container's `splitserve models pull`), or a known model name pulled at start.
"""

from __future__ import annotations

from typing import Any

from splitserve.app_config import ConfigError, parse_config


def build(args: dict[str, Any]):
    """Serve calls this with serveConfigV2's `args`; a bad config fails the deploy with a
    message naming the field (shown in the RayService's status)."""
    from splitserve.app import build_application
    from splitserve.up import resolve_embed_path, resolve_model_path

    config = args.get("config")
    if not isinstance(config, dict):
        raise ConfigError("serveConfigV2 args: expected `config`, the application config")
    cfg = parse_config(config)
    if not cfg.redis:
        raise ConfigError("config.redis: a RayService needs the cluster's Redis URL")
    model_dirs = {m.name: resolve_model_path(m) for m in cfg.models}
    return build_application(cfg, cfg.redis, model_dirs, resolve_embed_path(cfg))
