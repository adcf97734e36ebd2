"""Typed configuration of the router: the models it serves (what it needs to tokenize, hash
blocks and place requests for each), where the pools register, and its own endpoints.

Built once from the app config (splitserve) and handed to the router replica as is."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from kvstore.config import Membership
from router.admission import AdmissionLimits
from router.iccache.config import ICCacheConfig
from services.engine.sampling_params import SamplingDefaults

DEFAULT_MAX_BODY_BYTES = 8 << 20


@dataclass(frozen=True, kw_only=True)
class ModelRoute:
    """One served model as the router sees it. model_dir: where its tokenizer and chat
    template are (the router tokenizes and renders chats itself); model_id: the engines'
    block-hash identity of its weights (prefix-aware placement hashes prompts with it, so the
    router's block ids are the engines')."""

    name: str
    model_dir: str
    model_id: str
    block_size: int
    max_model_len: int
    mode: Literal["disaggregated", "colocated"] = "disaggregated"
    # The transformers class AutoTokenizer picks for model_dir, loaded by name here (without
    # AutoTokenizer, which would import torch); None: AutoTokenizer.
    tokenizer_class: str | None = None
    # Sampling for the fields a request leaves unset (the model's, under the app config's).
    defaults: SamplingDefaults = field(default_factory=SamplingDefaults)

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a model route needs a name")
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.mode not in ("disaggregated", "colocated"):
            raise ValueError(f"mode must be disaggregated or colocated, got {self.mode!r}")


@dataclass(frozen=True, kw_only=True)
class RouterConfig:
    """auth False: no API keys (the local demo only); on, tenants come from tenants_file or the
    environment (router.tenants.Tenants.load). grpc_port None: no gRPC Generate service;
    0: any free port. refresh_s: how long a read of the service registry is reused.
    max_resumes: how many times one request may continue on another replica after the one
    serving it was lost; resume_wait_s: how long a resumption waits for a replica to take it
    while none is live (router.migration). admission: this replica's bounds over all its
    requests, HTTP and gRPC (router.admission)."""

    models: tuple[ModelRoute, ...]
    cluster: Membership = field(default_factory=Membership)
    auth: bool = True
    tenants_file: str | None = None
    grpc_host: str = "127.0.0.1"
    grpc_port: int | None = 50051
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    refresh_s: float = 0.5
    max_resumes: int = 3
    resume_wait_s: float = 30.0
    iccache: ICCacheConfig | None = None  # IC-Cache routes over these models
    admission: AdmissionLimits = field(default_factory=AdmissionLimits)

    def __post_init__(self) -> None:
        object.__setattr__(self, "models", tuple(self.models))
        if not self.models:
            raise ValueError("the router needs at least one model")
        names = [m.name for m in self.models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate model names {dup}")
        if not self.cluster.redis_url:
            raise ValueError("the router needs the cluster's Redis URL to find the replicas")
        if self.grpc_port is not None and not 0 <= self.grpc_port <= 65535:
            raise ValueError(f"grpc_port must be within [0, 65535], got {self.grpc_port}")
        if self.max_body_bytes <= 0:
            raise ValueError(f"max_body_bytes must be positive, got {self.max_body_bytes}")
        if self.refresh_s <= 0:
            raise ValueError(f"refresh_s must be positive, got {self.refresh_s}")
        if self.max_resumes < 0:
            raise ValueError(f"max_resumes must be >= 0, got {self.max_resumes}")
        if self.resume_wait_s < 0:
            raise ValueError(f"resume_wait_s must be >= 0, got {self.resume_wait_s}")
        for r in self.iccache.routes if self.iccache is not None else ():
            if r.small not in names or r.large not in names or r.name in names:
                raise ValueError(
                    f"IC-Cache route {r.name!r}: its small and large models must be served "
                    f"({', '.join(names)}) and its name must not be one of them"
                )

    def route(self, name: str) -> ModelRoute:
        return next(m for m in self.models if m.name == name)
