"""The parts an engine is assembled from, chosen by its config and device: the model (weights
and attention backend), the size of its block pool, and its runner."""

from __future__ import annotations

from pathlib import Path

import torch

from services.engine import cpu_kernels
from services.engine.attention_cpu import TorchAttentionBackend
from services.engine.config import EngineConfig, ModelConfig
from services.engine.gpu_memory import gpu_kv_blocks
from services.engine.kv_cache import KVCache
from services.engine.model import LlamaModel
from services.engine.runner import ModelRunner
from services.engine.sampler import Sampler
from services.engine.weights import cpu_layout, load_weights, random_weights


def build_model(
    model_dir: Path, mcfg: ModelConfig, config: EngineConfig, max_model_len: int, fused: bool,
    seed: int | None,
) -> LlamaModel:  # fmt: skip
    """Weights (from the directory, or drawn at random for load_format "dummy") and the
    attention backend of the path the engine runs (fused: the CUDA one)."""
    dtype, device = config.resolve_dtype(mcfg), config.device
    if torch.device(device).type == "cpu":
        cpu_kernels.prepare()  # built (once a machine) now, not in the middle of a first step
    if config.load_format == "dummy":
        weights = random_weights(mcfg, dtype, device, seed or 0)
    elif config.load_format == "gguf":
        from services.engine.weights_gguf import load_gguf_weights

        weights = load_gguf_weights(model_dir, mcfg)
    else:
        weights = load_weights(model_dir, mcfg, dtype, device)
    if torch.device(device).type == "cpu":
        weights = cpu_layout(weights, packed=not config.kv_offload)
    if fused:
        from services.engine.attention_cuda import CudaAttentionBackend

        backend = CudaAttentionBackend()
    else:
        backend = TorchAttentionBackend()
    return LlamaModel(mcfg, weights, backend, max_model_len, dtype, device, fused=fused)


def pool_blocks(model: LlamaModel, config: EngineConfig, max_model_len: int) -> int:
    """Blocks of the engine's pool: num_kv_blocks, else what the GPU has room for, else
    kv_cache_memory_bytes worth on a CPU."""
    mcfg = model.cfg
    dtype = config.resolve_dtype(mcfg)
    per_block = KVCache.bytes_per_block(mcfg, config.block_size, dtype)
    if config.num_kv_blocks:
        return config.num_kv_blocks
    if torch.device(config.device).type == "cuda":
        return gpu_kv_blocks(model, mcfg, config, max_model_len, dtype, per_block)
    return max(2, config.kv_cache_memory_bytes // per_block)


def build_runner(
    model: LlamaModel, kv_cache: KVCache, config: EngineConfig, max_model_len: int,
    fused: bool, seed: int | None,
):  # fmt: skip
    """The runner: offload's (no KV here), the fused CUDA one (graphs, async results), or the
    reference one."""
    device = config.device
    if config.kv_offload:
        from services.engine.runner_cuda import graph_batch_sizes
        from services.engine.runner_offload import OffloadRunner

        graphs = fused and not config.enforce_eager
        limit = min(config.max_graph_batch_size, config.max_num_seqs)
        return OffloadRunner(
            model, config.block_size, Sampler(seed), device, pingpong=config.offload_pingpong,
            q_first=config.offload_q_first,
            graph_sizes=graph_batch_sizes(limit) if graphs else None,
        )  # fmt: skip
    if fused:
        from services.engine.runner_cuda import CudaModelRunner

        return CudaModelRunner(
            model, kv_cache, Sampler(seed), device,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=max_model_len,
            max_graph_batch_size=config.max_graph_batch_size,
            use_cuda_graphs=not config.enforce_eager,
        )  # fmt: skip
    lone = config.cpu_lone_step_threads if device == "cpu" else 0
    return ModelRunner(model, kv_cache, Sampler(seed), device, lone_threads=lone)
