"""Frozen configuration for the model and the engine, validated with actionable errors."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from services.engine.errors import ModelLoadError
from services.engine.sched_policy import POLICIES
from services.engine.swap_space import MODES as PREEMPTION_MODES

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def supported_message() -> str:
    return "supported architectures: " + ", ".join(sorted(SUPPORTED_ARCHITECTURES))


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 style frequency scaling (rope_type "llama3") or linear position scaling."""

    rope_type: str  # "llama3" | "linear"
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # key of SUPPORTED_ARCHITECTURES
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v projections carry a bias (Qwen2)
    rope_scaling: RopeScaling | None
    torch_dtype: str  # as stored on disk
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )

    @property
    def kv_bytes_per_token(self) -> int:
        itemsize = torch.empty((), dtype=DTYPES[self.torch_dtype]).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir)
        if not path.is_dir():
            raise ModelLoadError(f"model directory not found: {path}")
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise ModelLoadError(f"{path} has no config.json; expected a Hugging Face model dir")
        try:
            raw = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"{cfg_file} is not valid JSON: {e}") from None
        gen_file = path / "generation_config.json"
        gen = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
        return cls.from_hf(raw, gen)

    @classmethod
    def from_hf(cls, raw: dict[str, Any], gen: dict[str, Any] | None = None) -> ModelConfig:
        archs = raw.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ModelLoadError(
                f"unsupported model architecture {archs or raw.get('model_type')!r}; "
                + supported_message()
            )
        try:
            hidden = int(raw["hidden_size"])
            heads = int(raw["num_attention_heads"])
            rope_scaling = _rope_scaling(raw)
            eos = _eos_ids(raw, gen or {})
            dtype = str(raw.get("torch_dtype") or raw.get("dtype") or "float32")
            if dtype not in DTYPES:
                raise ModelLoadError(
                    f"unsupported torch_dtype {dtype!r}; supported: {', '.join(DTYPES)}"
                )
            family = SUPPORTED_ARCHITECTURES[arch]
            return cls(
                architecture=arch,
                vocab_size=int(raw["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(raw["intermediate_size"]),
                num_layers=int(raw["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(raw.get("num_key_value_heads") or heads),
                head_dim=int(raw.get("head_dim") or hidden // heads),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                rope_theta=float(_rope_theta(raw)),
                max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                attention_bias=family == "qwen2" or bool(raw.get("attention_bias", False)),
                rope_scaling=rope_scaling,
                torch_dtype=dtype,
                eos_token_ids=eos,
                bos_token_id=raw.get("bos_token_id"),
                sliding_window=_sliding_window(raw, family),
            )
        except KeyError as e:
            raise ModelLoadError(f"config.json lacks required field {e.args[0]!r}") from None


def _rope_theta(raw: dict[str, Any]) -> float:
    if "rope_theta" in raw:
        return raw["rope_theta"]
    params = raw.get("rope_parameters") or {}
    return params.get("rope_theta", 10000.0)


def _rope_scaling(raw: dict[str, Any]) -> RopeScaling | None:
    rs = raw.get("rope_scaling") or raw.get("rope_parameters")
    if not rs:
        return None
    kind = rs.get("rope_type") or rs.get("type") or "default"
    if kind == "default":
        return None
    if kind == "llama3":
        return RopeScaling(
            rope_type="llama3",
            factor=float(rs["factor"]),
            low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(rs.get("original_max_position_embeddings", 8192)),
        )
    if kind == "linear":
        return RopeScaling(rope_type="linear", factor=float(rs["factor"]))
    raise ModelLoadError(f"unsupported rope_scaling type {kind!r}; supported: llama3, linear")


def _sliding_window(raw: dict[str, Any], family: str) -> int | None:
    # Qwen2 configs carry a sliding_window that only applies when use_sliding_window is set.
    if family == "qwen2" and not raw.get("use_sliding_window", False):
        return None
    sw = raw.get("sliding_window")
    if sw is not None and int(sw) < int(raw.get("max_position_embeddings", 0)):
        raise ModelLoadError(
            f"sliding_window={sw} attention is not supported; use a model with full attention"
        )
    return None


def _eos_ids(raw: dict[str, Any], gen: dict[str, Any]) -> tuple[int, ...]:
    ids: list[int] = []
    for src in (gen.get("eos_token_id"), raw.get("eos_token_id")):
        if src is None:
            continue
        for t in src if isinstance(src, list) else [src]:
            if int(t) not in ids:
                ids.append(int(t))
    return tuple(ids)


@dataclass(frozen=True)
class EngineConfig:
    """Knobs of one engine instance.

    num_kv_blocks None sizes the cache from kv_cache_memory_bytes on the CPU, and on a GPU from
    gpu_memory_utilization: that fraction of the card's memory, less what is already in use
    (weights, other processes) and the activations of a max_num_batched_tokens forward pass,
    capped at four times what max_num_seqs contexts of max_model_len can hold.

    GPU only: kernels "auto" runs the fused Triton path (paged decode kernel, fused RMSNorm,
    RoPE + KV write, SiLU-mul), "torch" the reference path the CPU runs. enforce_eager skips
    CUDA graphs for decode steps. async_scheduling lets the CPU schedule and prepare step n+1
    while the GPU computes step n (step() then returns step n's outputs).
    load_format "dummy" skips the checkpoint and draws random weights on the device (benchmarks);
    "gguf" serves the GGUF file the model was pulled from with its 4-bit blocks kept (Q4_0, Q4_1:
    services/engine/weights_gguf.py), on the CPU only: ~4x less weight memory to stream per
    token, and tokens close to, not equal to, float32's (never the parity path).
    scheduling_policy orders admission and preemption (services/engine/sched_policy.py): "fcfs"
    admits in arrival order and preempts the newest running request; "priority" admits by
    add_request's priority (lower first, ties in arrival order) and preempts the running request
    with the highest value, newest first (and a waiting request preempts running ones of a
    worse priority when blocks lack).
    preemption_mode: what a preempted request's KV becomes (services/engine/swap_space.py):
    "recompute" drops it, "swap" copies it to swap_space_blocks host blocks block by block and
    synchronously (vLLM's former swap), "fastswitch" in contiguous block groups, asynchronously,
    keeping the host copy for the next swap-out (FastSwitch).
    kv_offload: attention offload's model worker: no KV here; the engine's num_kv_blocks blocks
    live on attention workers (attach_shards), each holding a range of KV heads. offload_pingpong
    splits decode steps in two batches that take turns; offload_q_first sends q before k, v.
    Both are off by default: they hide round trips when model and attention workers run on
    separate devices, and measured slower where the two share one (docs/benchmarks.md).
    cpu_lone_step_threads: CPU, torch threads for a step of one row (a lone sequence decoding;
    0: the process's own, as for every other step). Where the serving stack shares the cores,
    the router, ingress and client wake for every token and preempt one of the engine's
    threads, and a one-row GEMM waits at its barrier for that thread: a core left to them
    measured faster for one user (docs/benchmarks.md), while batches keep every core.
    """

    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory_bytes: int = 512 * 1024**2
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "cpu"
    model_id: str | None = None  # identity used in block hashes; defaults to the model dir name
    gpu_memory_utilization: float = 0.9
    kernels: str = "auto"  # auto | torch
    enforce_eager: bool = False
    max_graph_batch_size: int = 256  # decode steps up to this many sequences replay a graph
    async_scheduling: bool = True
    load_format: str = "auto"  # auto | dummy | gguf
    scheduling_policy: str = "fcfs"  # fcfs | priority
    preemption_mode: str = "recompute"  # recompute | swap | fastswitch
    swap_space_blocks: int | None = None  # host blocks for swapping; None: the pool's size
    kv_offload: bool = False
    offload_pingpong: bool = False
    offload_q_first: bool = False
    cpu_lone_step_threads: int = 0

    def __post_init__(self) -> None:
        if self.kv_offload and self.num_kv_blocks is None:
            raise ValueError(
                "kv_offload needs num_kv_blocks: the blocks its attention workers hold"
            )
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 2:
            raise ValueError(f"num_kv_blocks must be >= 2, got {self.num_kv_blocks}")
        if self.max_num_seqs <= 0:
            raise ValueError(f"max_num_seqs must be positive, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.cpu_lone_step_threads < 0:
            raise ValueError(
                f"cpu_lone_step_threads must be >= 0, got {self.cpu_lone_step_threads}"
            )
        if self.kernels not in ("auto", "torch"):
            raise ValueError(f"kernels must be auto or torch, got {self.kernels!r}")
        if self.load_format not in ("auto", "dummy", "gguf"):
            raise ValueError(f"load_format must be auto, dummy or gguf, got {self.load_format!r}")
        if self.load_format == "gguf" and (
            self.device != "cpu" or self.kv_offload or self.dtype not in ("auto", "float32")
        ):
            raise ValueError(
                "load_format gguf (4-bit weights) runs on the CPU's float32 path only: "
                f"device cpu, dtype auto or float32, no kv_offload (got device {self.device!r}, "
                f"dtype {self.dtype!r}, kv_offload {self.kv_offload})"
            )
        if self.scheduling_policy not in POLICIES:
            raise ValueError(
                f"scheduling_policy must be one of {', '.join(POLICIES)}, "
                f"got {self.scheduling_policy!r}"
            )
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ValueError(
                f"preemption_mode must be one of {', '.join(PREEMPTION_MODES)}, "
                f"got {self.preemption_mode!r}"
            )
        if self.swap_space_blocks is not None and self.swap_space_blocks < 1:
            raise ValueError(f"swap_space_blocks must be >= 1, got {self.swap_space_blocks}")
        if self.kv_offload and self.preemption_mode != "recompute":
            raise ValueError("kv_offload keeps no KV here to swap: preemption_mode recompute")
        if self.max_graph_batch_size < 0:
            raise ValueError("max_graph_batch_size must be >= 0")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {self.dtype}")

    def resolve_dtype(self, model: ModelConfig) -> torch.dtype:
        """auto: float32 on CPU (no native bf16 there: ~100x slower), the stored dtype on GPU."""
        if self.dtype != "auto":
            return DTYPES[self.dtype]
        if self.device == "cpu":
            return torch.float32
        stored = DTYPES[model.torch_dtype]
        return torch.bfloat16 if stored == torch.float32 else stored
