"""The two ceilings a GPU benchmark is measured against, and a model's rooflines under them:
the device's copy bandwidth and bf16 matmul peak (measured, not datasheet), decode as every
weight plus every context's KV read once a step, prefill as its matmul FLOPs."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

from services.engine.config import ModelConfig


def time_cuda(fn, reps: int, warmup: int = 3) -> float:
    """Median seconds of fn() over reps, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Bytes/s of a 2 GiB device-to-device copy, counting bytes read plus bytes written."""
    n = 2 * 1024**3
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = time_cuda(lambda: dst.copy_(src), 20)
    return 2 * n / t


def matmul_peak() -> float:
    """FLOP/s of an 8192^3 bf16 matrix product on random data (cuBLAS)."""
    n = 8192
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    t = time_cuda(lambda: a @ b, 30)
    return 2 * n**3 / t


@dataclass(frozen=True)
class Shape:
    params: int  # all weights, the embedding (and a separate LM head) included
    linear: int  # weights of the per-token matmuls in the layers
    kv_bytes_per_token: int
    layers: int
    heads: int
    head_dim: int
    hidden: int
    vocab: int

    @classmethod
    def of(cls, cfg: ModelConfig) -> Shape:
        h, d, i = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
        per_layer = h * (cfg.num_heads + 2 * cfg.num_kv_heads) * d + cfg.num_heads * d * h
        per_layer += 3 * h * i
        embed = cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2)
        params = cfg.num_layers * (per_layer + 2 * h) + embed + h
        return cls(
            params=params,
            linear=cfg.num_layers * per_layer,
            kv_bytes_per_token=2 * cfg.num_layers * cfg.num_kv_heads * d * 2,
            layers=cfg.num_layers,
            heads=cfg.num_heads,
            head_dim=d,
            hidden=h,
            vocab=cfg.vocab_size,
        )

    def decode_roofline(self, batch: int, bw: float, ctx: float) -> float:
        """Tokens/s at `batch` sequences of mean context `ctx` and copy bandwidth `bw`."""
        step_bytes = 2 * self.params + batch * ctx * self.kv_bytes_per_token
        return batch / (step_bytes / bw)

    def prefill_flops(self, t: int) -> float:
        attn = 2 * self.layers * self.heads * self.head_dim * t * t  # QK^T and PV, causal half
        return 2 * t * self.linear + attn + 2 * self.hidden * self.vocab

    def prefill_roofline(self, t: int, peak: float) -> float:
        return t / (self.prefill_flops(t) / peak)
