"""The one YAML file that describes a splitserve application, validated at this edge.

    redis: redis://host:6379/0        # omitted: a private local server (splitserve up)
    namespace: splitserve
    http: {host: 127.0.0.1, port: 8000}
    grpc: {host: 127.0.0.1, port: 50051}   # the Generate service; port 0 picks one
    auth: {enabled: true, tenants_file: tenants.yaml}
    metrics: {port: 9321}                  # every replica of a node on one /metrics; 0: off
    router: {replicas: 1, admission: {max_running: 1024, max_queued: 1024, max_queue_s: 30}}
    models:
      - name: smollm2-135m-instruct
        path: smollm2-135m-instruct        # a directory or a known model name
        dtype: auto
        mode: disaggregated                # or colocated
        prefill: {replicas: 1, num_gpus: 0, num_cpus: 0, device_pool: 2GiB}  # + its GPU share
        decode: {replicas: 1, num_gpus: 0, num_cpus: 0}
        attention: {replicas: 2, num_kv_blocks: 4096, lend_fraction: 1.0}  # optional: KV lenders
        engine: {max_num_seqs: 64, max_num_batched_tokens: 512, block_size: 16}  # load_format: gguf
        sampling: {temperature: 0.7, max_tokens: 1024}   # unset by a request; over the model's
    iccache: {routes: [{name: auto, small: A, large: B}]}  # optional: splitserve.iccache_spec

Errors name the field: `models.0.prefill.replicas: Input should be greater than or equal to 1`,
`models.0.engine.block_size: block_size must be a positive power of two, got 24`.
"""

from __future__ import annotations

import dataclasses
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
from splitserve.iccache_spec import ICCacheSpec

DEFAULT_METRICS_PORT = 9321


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Autoscaling(_Strict):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(16, gt=0)


class Placement(_Strict):
    """Where a role's replicas run and how many: what Ray Serve needs of every role."""

    replicas: int = Field(1, ge=1)
    num_gpus: float = Field(0, ge=0)
    num_cpus: float = Field(0, ge=0)  # 0 lets replicas start on a 2-core machine
    autoscaling: Autoscaling | None = None
    # CPU engines: torch threads (0: all cores; Ray would otherwise pin a 0-CPU replica to one).
    threads: int = Field(0, ge=0)
    # CPU engines: threads for a step of one row, a lone sequence decoding (None: with 4-bit
    # weights threads less one, at least one, a core left to the router, ingress and client
    # that wake per token, else threads; 0: threads). EngineConfig.cpu_lone_step_threads.
    lone_threads: int | None = Field(None, ge=0)


class ReplicaSpec(Placement):
    """A prefill, decode or colocated role: an engine replica."""

    max_waiting: int = Field(256, ge=1)
    kv_memory: str = "1GiB"  # prefill: its KV shard
    # Prefill on a GPU: hand-off KV kept on the GPU, which a decode on the same host copies GPU
    # to GPU (CUDA IPC); others get it as bytes. "0" turns it off.
    device_pool: str = "2GiB"
    # This role's tokens a step, over engine.max_num_batched_tokens: a prefill-only replica has
    # no decodes to protect and can take whole prompts a step.
    max_num_batched_tokens: int | None = Field(None, ge=1)
    # Decode or colocated: lend up to this share of the engine's KV pool, while its own work
    # leaves it free, to the other decoders of the model (which then borrow). 0: lend nothing.
    lend_fraction: float = Field(0.0, ge=0.0, le=1.0)
    # On a GPU: this replica's share of the card (weights, activations, KV), over the engine
    # section's; replicas sharing one GPU (num_gpus 0.5 each) each take their own share.
    gpu_memory_utilization: float | None = Field(None, gt=0.0, le=1.0)

    @field_validator("kv_memory", "device_pool")
    @classmethod
    def _size(cls, v: str) -> str:
        parse_size(v)  # its ValueError names the value and shows examples
        return v


class AttentionSpec(Placement):
    """Attention replicas (DistAttention): KV pools with no weights that lend blocks to the
    model's decode (or colocated) replicas when theirs are short, and attend over them. The
    pool: num_kv_blocks blocks, or kv_memory worth (unset: as the engine section sizes the
    decoders' pool); lend_fraction of it may be lent."""

    num_kv_blocks: int | None = Field(None, ge=2)
    kv_memory: str | None = None
    lend_fraction: float = Field(1.0, ge=0, le=1)

    @field_validator("kv_memory")
    @classmethod
    def _size(cls, v: str | None) -> str | None:
        if v is not None:
            parse_size(v)
        return v

    @model_validator(mode="after")
    def _one_pool_size(self) -> AttentionSpec:
        if self.num_kv_blocks is not None and self.kv_memory is not None:
            raise ValueError("num_kv_blocks and kv_memory both size the pool: set one")
        return self


class EngineSpec(_Strict):
    """The engine's knobs (services.engine.config.EngineConfig, which holds the one rule for
    each: this spec is checked by building one). Unset: the engine's default."""

    block_size: int | None = None
    num_kv_blocks: int | None = None
    kv_cache_memory: str | None = None  # CPU engines without num_kv_blocks, e.g. 2GiB
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None
    enable_prefix_caching: bool | None = None
    gpu_memory_utilization: float | None = None
    kernels: Literal["auto", "torch"] | None = None
    enforce_eager: bool | None = None
    max_graph_batch_size: int | None = None
    async_scheduling: bool | None = None
    # gguf: the pulled GGUF's 4-bit blocks served as they are (CPU only; opt-in, near float32);
    # dummy: random weights drawn on the device, no checkpoint read (benchmarks, GPU shapes of
    # a preset: every replica draws the same ones)
    load_format: Literal["auto", "gguf", "dummy"] | None = None
    # Fairness (issue 17): admission/preemption order, and what a preempted request's KV becomes.
    scheduling_policy: Literal["fcfs", "priority"] | None = None
    preemption_mode: Literal["recompute", "swap", "fastswitch"] | None = None
    swap_space_blocks: int | None = None
    # mode offload: two batches taking turns, and q sent before k, v (docs/offload.md: both
    # pay off with the model and attention workers on separate devices; off by default)
    offload_pingpong: bool | None = None
    offload_q_first: bool | None = None

    @field_validator("kv_cache_memory")
    @classmethod
    def _size(cls, v: str | None) -> str | None:
        if v is not None:
            parse_size(v)
        return v

    @model_validator(mode="after")
    def _engine_rules(self) -> EngineSpec:
        self.engine_config()  # raises ValueError naming the field
        return self

    def engine_config(self, **overrides):
        """The EngineConfig these settings describe (overrides: dtype, device, per-role
        budgets), with the engine's defaults for what is unset."""
        from services.engine.config import EngineConfig

        kw = self.model_dump(exclude={"kv_cache_memory"}, exclude_none=True)
        if self.kv_cache_memory is not None:
            kw["kv_cache_memory_bytes"] = parse_size(self.kv_cache_memory)
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return EngineConfig(**kw)


class SamplingSpec(_Strict):
    """What a request gets for the sampling fields it leaves unset, over the model directory's
    generation_config.json (services.engine.sampling_params.SamplingDefaults holds the rules).
    max_tokens caps a chat that names none (completions keep the API's 16)."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None

    @model_validator(mode="after")
    def _sampling_rules(self) -> SamplingSpec:
        self.over(None)  # raises ValueError naming the field
        return self

    def over(self, model_dir: Path | None):
        """These settings over the model's own defaults (the built-in ones without a dir)."""
        from services.engine.sampling_params import SamplingDefaults

        base = SamplingDefaults.from_model_dir(model_dir) if model_dir else SamplingDefaults()
        return base.merged(**self.model_dump())


class ModelSpec(_Strict):
    name: str = Field(min_length=1)
    path: str = Field(min_length=1)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # offload: colocated replicas are model workers with no KV; the attention replicas hold
    # their KV heads and attend for them (attention offload, Lamina). `attention` sizes them.
    mode: Literal["disaggregated", "colocated", "offload"] = "disaggregated"
    prefill: ReplicaSpec = ReplicaSpec()
    decode: ReplicaSpec = ReplicaSpec()
    colocated: ReplicaSpec = ReplicaSpec()
    # Set: attention replicas lend KV to this model's decoders, which then borrow (borrow_kv).
    attention: AttentionSpec | None = None
    engine: EngineSpec = EngineSpec()
    sampling: SamplingSpec = SamplingSpec()

    @property
    def serving_roles(self) -> tuple[str, ...]:
        """The roles that run the model (an engine each)."""
        if self.mode == "disaggregated" or self.offload_prefill:
            return ("prefill", "decode")
        return ("colocated",)

    @property
    def offload(self) -> bool:
        return self.mode == "offload"

    @property
    def offload_prefill(self) -> bool:
        """Mode offload with a prefill section: prefill replicas hand KV off to the model
        workers (decode replicas), which write it to the attention workers."""
        return self.offload and "prefill" in self.model_fields_set

    @property
    def model_worker_role(self) -> str:
        """Mode offload: the role of the model workers."""
        return "decode" if self.offload_prefill else "colocated"

    @property
    def roles(self) -> tuple[str, ...]:
        """Every role of this model's pool: the serving ones, then attention if set."""
        return self.serving_roles + (("attention",) if self.attention is not None else ())

    @property
    def borrows_kv(self) -> bool:
        """Whether the decode (or colocated) replicas borrow KV: from attention replicas, or
        from each other when they lend."""
        if self.offload:
            return False  # offload's model workers keep no KV to borrow for
        if self.attention is not None:
            return True
        side = getattr(self, "decode" if self.mode == "disaggregated" else "colocated", None)
        return bool(side is not None and side.lend_fraction > 0)

    def side(self, role: str) -> Placement:
        side = getattr(self, role)
        if side is None:
            raise ValueError(f"model {self.name!r} has no {role} replicas")
        return side

    def engine_config(self, role: str, device: str = "cpu"):
        """This role's EngineConfig: the model's engine settings, its dtype, the role's own
        step budget (an attention role: its own pool size), on `device`."""
        side = self.side(role)
        if isinstance(side, AttentionSpec):
            cfg = self.engine.engine_config(dtype=self.dtype, device=device)
            if side.num_kv_blocks is not None:
                return dataclasses.replace(cfg, num_kv_blocks=side.num_kv_blocks)
            if side.kv_memory is not None:
                return dataclasses.replace(
                    cfg, num_kv_blocks=None, kv_cache_memory_bytes=parse_size(side.kv_memory)
                )
            return cfg
        assert isinstance(side, ReplicaSpec)
        return self.engine.engine_config(
            dtype=self.dtype,
            device=device,
            max_num_batched_tokens=side.max_num_batched_tokens,
            gpu_memory_utilization=side.gpu_memory_utilization,
        )

    @model_validator(mode="after")
    def _roles_engine_rules(self) -> ModelSpec:
        for role in self.roles:
            self.engine_config(role)  # the role's overrides against the engine's rules
        if self.prefill is not None and self.prefill.lend_fraction:
            raise ValueError("prefill.lend_fraction: only decode and colocated replicas lend KV")
        if self.offload:
            self._offload_rules()
        return self

    def _offload_rules(self) -> None:
        if self.attention is None:
            raise ValueError("mode offload needs an attention section: the workers holding KV")
        role = self.model_worker_role
        workers = getattr(self, role)
        if workers.lend_fraction:
            raise ValueError(f"{role}.lend_fraction: offload's model workers hold no KV to lend")
        if workers.autoscaling or self.attention.autoscaling:
            raise ValueError(
                "mode offload: set fixed replicas (every model worker holds a region on every "
                "attention worker)"
            )
        for field in ("num_kv_blocks", "kv_cache_memory"):
            if getattr(self.engine, field) is not None:
                raise ValueError(
                    f"engine.{field}: in mode offload the attention section sizes the KV "
                    "(attention.num_kv_blocks or attention.kv_memory)"
                )


class Endpoint(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)


class AuthSpec(_Strict):
    enabled: bool = True
    tenants_file: str | None = None


class AdmissionSpec(_Strict):
    """Each router replica's bounds over all its requests, HTTP and gRPC (router.admission):
    at most max_running in the pools, max_queued more waiting (each at most max_queue_s), the
    rest refused at once with HTTP 429 + Retry-After / gRPC RESOURCE_EXHAUSTED. Size
    max_running near what the pools serve within their SLOs (goodput), so that an overload is
    shed at the door and admitted requests keep their latency."""

    max_running: int = Field(1024, ge=1)
    max_queued: int = Field(1024, ge=0)
    max_queue_s: float = Field(30.0, gt=0, allow_inf_nan=False)

    def limits(self):
        from router.admission import AdmissionLimits

        return AdmissionLimits(self.max_running, self.max_queued, self.max_queue_s)


class RouterSpec(_Strict):
    replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0, ge=0)
    # Serve's per-replica cap on requests in flight (its default, 5, would queue streams in the
    # proxy); admission below and the tenants' limits are the real admission control.
    max_ongoing_requests: int = Field(4096, ge=1)
    # Ray custom resources each router replica needs: in Kubernetes the head pod alone offers
    # one, so the router (and its gRPC port) lands where the gRPC Service points.
    resources: dict[str, float] = Field(default_factory=dict)
    # Request migration (router.migration): how often one request may continue on another
    # replica after losing its own, and how long it waits for one while none is live (a
    # single decode replica being restarted).
    max_resumes: int = Field(3, ge=0)
    resume_wait_s: float = Field(30.0, ge=0)
    admission: AdmissionSpec = AdmissionSpec()

    @model_validator(mode="after")
    def _admission_within_serve(self) -> RouterSpec:
        a = self.admission
        if a.max_running + a.max_queued > self.max_ongoing_requests:
            # Past Serve's cap, requests would wait in Serve's own queue, which no one bounds.
            raise ValueError(
                f"admission: max_running + max_queued ({a.max_running} + {a.max_queued}) must "
                f"be at most max_ongoing_requests ({self.max_ongoing_requests})"
            )
        return self


class MetricsSpec(_Strict):
    """Each node serves the /metrics of all its replicas on this port (splitserve.node_metrics;
    the Helm chart's PodMonitor scrapes it). 0: no node endpoint (each replica's own, on a free
    port, stays listed in Redis)."""

    port: int = Field(DEFAULT_METRICS_PORT, ge=0, le=65535)


class AppConfig(_Strict):
    redis: str | None = None
    namespace: str = "splitserve"
    http: Endpoint = Endpoint()
    grpc: Endpoint = Endpoint(port=50051)
    auth: AuthSpec = AuthSpec()
    router: RouterSpec = RouterSpec()
    metrics: MetricsSpec = MetricsSpec()
    models: list[ModelSpec] = Field(min_length=1)
    # IC-Cache routes over two of the models, and the embedding replica (splitserve.iccache_spec)
    iccache: ICCacheSpec | None = None

    @model_validator(mode="after")
    def _unique_names(self) -> AppConfig:
        names = [m.name for m in self.models]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"models: duplicate model names {sorted(dup)}")
        return self

    @model_validator(mode="after")
    def _iccache_models(self) -> AppConfig:
        if self.iccache is not None:
            self.iccache.check_models([m.name for m in self.models])
        return self


class ConfigError(ValueError):
    pass


def parse_config(data: dict) -> AppConfig:
    try:
        return AppConfig.model_validate(data)
    except ValidationError as e:
        msg = "; ".join(_describe(err) for err in e.errors())
        raise ConfigError(f"invalid config: {msg}") from None


def _describe(err) -> str:
    """`path.to.field: message`. A rule checked over a whole section (EngineSpec's, by
    building an EngineConfig) names its field first in the message: that field joins the path."""
    loc = [str(p) for p in err["loc"]]
    msg = err["msg"].removeprefix("Value error, ")
    first = msg.split(" ", 1)[0]
    if isinstance(err.get("input"), dict) and first in err["input"]:
        loc.append(first)
    return f"{'.'.join(loc) or '(top level)'}: {msg}"


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
