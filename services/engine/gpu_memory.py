"""How many KV blocks an engine on a GPU gets: what is left of its gpu_memory_utilization share
of the card after its weights (already loaded), the peak activations of a full-budget forward
pass (profiled) and the sampler's float32 logits.

The share is this engine's own, not the card's: two replicas on one GPU (a prefill at 0.3, a
decode at 0.55) each get theirs whichever sizes its cache first, since what another process
holds does not count against it. Free memory still bounds it (a share the card no longer has
is not taken)."""

from __future__ import annotations

import torch

from services.engine.attention import AttentionMetadata, PrefillSeq
from services.engine.config import EngineConfig, ModelConfig
from services.engine.errors import ModelLoadError
from services.engine.kv_cache import KVCache
from services.engine.model import LlamaModel
from services.engine.scheduler import blocks_for


def gpu_kv_blocks(
    model: LlamaModel,
    mcfg: ModelConfig,
    cfg: EngineConfig,
    max_model_len: int,
    dtype: torch.dtype,
    per_block: int,
) -> int:
    """KV blocks that fit in this engine's gpu_memory_utilization share of the card after its
    weights, the peak activations of a full-budget forward pass and the sampler's float32
    logits (the CUDA graphs' pool fits in the latter), within the card's free memory, at most
    4 x max_num_seqs full contexts."""
    activations = profile_forward(model, mcfg, cfg, max_model_len, dtype)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(cfg.device)
    own = torch.cuda.memory_reserved(cfg.device)
    rows = max(cfg.max_num_seqs, cfg.max_graph_batch_size)
    logits = 8 * rows * mcfg.vocab_size * 4  # float32 copies of the sampled rows' logits
    budget = kv_budget(total, free, own, cfg.gpu_memory_utilization) - activations - logits
    num_blocks = int(budget // per_block) - 1
    # A small model on a large card would get millions of blocks (and as many Python objects in
    # the pool); four times the most that running sequences can hold is plenty.
    num_blocks = min(num_blocks, 4 * cfg.max_num_seqs * blocks_for(max_model_len, cfg.block_size))
    if num_blocks < 2:
        raise ModelLoadError(
            f"no GPU memory left for the KV cache: {free / 2**30:.1f} GiB free of "
            f"{total / 2**30:.1f} GiB, activations need {activations / 2**30:.1f} GiB; "
            "raise gpu_memory_utilization or lower max_num_batched_tokens"
        )
    return num_blocks


def kv_budget(total: int, free: int, own: int, utilization: float) -> float:
    """Bytes this engine may still take: its share of the card less what it holds already
    (own: its reserved memory, the weights), within the card's free memory less a margin for
    its CUDA context's growth (cuBLAS workspaces, graph pools) and fragmentation."""
    return min(total * utilization - own, free - 0.02 * total)


@torch.inference_mode()
def profile_forward(
    model: LlamaModel, mcfg: ModelConfig, cfg: EngineConfig, max_model_len: int, dtype
) -> int:
    """Peak bytes a forward pass over max_num_batched_tokens prompt tokens allocates."""
    n = min(cfg.max_num_batched_tokens, max_model_len)
    bs, device = cfg.block_size, cfg.device
    cache = KVCache.allocate(mcfg, 1, bs, dtype, device)
    meta = AttentionMetadata(
        num_decode=0,
        slot_mapping=torch.arange(n, device=device) % bs,  # all into the one block
        decode_block_table=None,
        decode_mask=None,
        prefills=(PrefillSeq(0, n, n, None),),
        scale=mcfg.head_dim**-0.5,
        block_size=bs,
    )
    ids = torch.zeros(n, dtype=torch.long, device=device)
    pos = torch.arange(n, device=device)
    last = torch.tensor([n - 1], device=device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    model.forward(ids, pos, meta, cache, last)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base
