"""The one YAML file that describes a splitserve application, validated at this edge.

    redis: redis://host:6379/0        # omitted: a private local server (splitserve up)
    namespace: splitserve
    http: {host: 127.0.0.1, port: 8000}
    grpc: {host: 127.0.0.1, port: 50051}   # the Generate service; port 0 picks one
    auth: {enabled: true, tenants_file: tenants.yaml}
    router: {replicas: 1}
    models:
      - name: smollm2-135m-instruct
        path: smollm2-135m-instruct        # a directory or a known model name
        dtype: auto
        mode: disaggregated                # or colocated
        prefill: {replicas: 1, num_gpus: 0, num_cpus: 0, device_pool: 2GiB}
        decode: {replicas: 1, num_gpus: 0, num_cpus: 0}
        engine: {max_num_seqs: 64, max_num_batched_tokens: 512}

Errors name the field: `models.0.prefill.replicas: Input should be greater than or equal to 1`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from kvstore.sizes import parse_size


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Autoscaling(_Strict):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(16, gt=0)


class ReplicaSpec(_Strict):
    replicas: int = Field(1, ge=1)
    num_gpus: float = Field(0, ge=0)
    num_cpus: float = Field(0, ge=0)  # 0 lets replicas start on a 2-core machine
    max_waiting: int = Field(256, ge=1)
    kv_memory: str = "1GiB"  # prefill: its KV shard
    # Prefill on a GPU: hand-off KV kept on the GPU, which a decode on the same host copies GPU
    # to GPU (CUDA IPC); others get it as bytes. "0" turns it off.
    device_pool: str = "2GiB"
    # This role's tokens a step, over engine.max_num_batched_tokens: a prefill-only replica has
    # no decodes to protect and can take whole prompts a step.
    max_num_batched_tokens: int | None = Field(None, ge=1)

    @field_validator("kv_memory", "device_pool")
    @classmethod
    def _size(cls, v: str) -> str:
        parse_size(v)  # its ValueError names the value and shows examples
        return v

    autoscaling: Autoscaling | None = None
    # CPU engines: torch threads (0: all cores; Ray would otherwise pin a 0-CPU replica to one).
    threads: int = Field(0, ge=0)


class EngineSpec(_Strict):
    max_num_seqs: int = Field(64, ge=1)
    max_num_batched_tokens: int = Field(512, ge=1)
    num_kv_blocks: int | None = Field(None, ge=2)
    block_size: int = Field(16, ge=1)
    max_model_len: int | None = Field(None, ge=2)


class ModelSpec(_Strict):
    name: str = Field(min_length=1)
    path: str = Field(min_length=1)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    mode: Literal["disaggregated", "colocated"] = "disaggregated"
    prefill: ReplicaSpec = ReplicaSpec()
    decode: ReplicaSpec = ReplicaSpec()
    colocated: ReplicaSpec = ReplicaSpec()
    engine: EngineSpec = EngineSpec()


class Endpoint(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)


class AuthSpec(_Strict):
    enabled: bool = True
    tenants_file: str | None = None


class RouterSpec(_Strict):
    replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0, ge=0)
    # Serve's per-replica cap on requests in flight (its default, 5, would queue streams in the
    # proxy); tenant limits are the real admission control.
    max_ongoing_requests: int = Field(4096, ge=1)


class AppConfig(_Strict):
    redis: str | None = None
    namespace: str = "splitserve"
    http: Endpoint = Endpoint()
    grpc: Endpoint = Endpoint(port=50051)
    auth: AuthSpec = AuthSpec()
    router: RouterSpec = RouterSpec()
    models: list[ModelSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> AppConfig:
        names = [m.name for m in self.models]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"models: duplicate model names {sorted(dup)}")
        return self


class ConfigError(ValueError):
    pass


def parse_config(data: dict) -> AppConfig:
    try:
        return AppConfig.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
            lines.append(f"{loc}: {err['msg']}")
        raise ConfigError("invalid config: " + "; ".join(lines)) from None


def load_config(path: str | Path) -> AppConfig:
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read config {p}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config {p} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {p}: expected a mapping at the top level")
    return parse_config(data)
