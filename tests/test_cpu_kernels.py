"""The engine's own CPU kernels (services/engine/cpu_kernels.py): decode attention over the paged
cache against SDPA over the gathered contexts, and SPLITSERVE_CPU_KERNELS. (The int4 kernel's
tests are in test_gguf_int4.py.)"""

from __future__ import annotations

import pytest
import torch

from services.engine import cpu_kernels
from services.engine.attention import AttentionMetadata
from services.engine.attention_cpu import TorchAttentionBackend


def _use(monkeypatch, value: str | None) -> None:
    monkeypatch.setattr(cpu_kernels, "_state", {})
    if value is None:
        monkeypatch.delenv(cpu_kernels.ENV, raising=False)
    else:
        monkeypatch.setenv(cpu_kernels.ENV, value)


def _step(lens: list[int], bs: int = 16, hkv: int = 3, group: int = 3, d: int = 64):
    """A decode step's q, new k/v, caches and metadata: one new token a sequence, its context
    in scattered blocks, the table padded with block 0."""
    g = torch.Generator().manual_seed(len(lens) * 1000 + sum(lens))
    n_blocks = 64
    kc = torch.randn(n_blocks * bs, hkv, d, generator=g)
    vc = torch.randn(n_blocks * bs, hkv, d, generator=g)
    perm = torch.randperm(n_blocks, generator=g).tolist()
    nblk = max(-(-n // bs) for n in lens)
    table = torch.zeros(len(lens), nblk, dtype=torch.long)
    slots = []
    for r, n in enumerate(lens):
        own = [perm.pop() for _ in range(-(-n // bs))]
        table[r, : len(own)] = torch.tensor(own)
        slots.append(own[(n - 1) // bs] * bs + (n - 1) % bs)  # where the new token goes
    valid = torch.arange(nblk * bs)[None, :] < torch.tensor(lens)[:, None]
    meta = AttentionMetadata(
        num_decode=len(lens),
        slot_mapping=torch.tensor(slots),
        decode_block_table=table,
        decode_mask=valid[:, None, None, :],
        prefills=(),
        scale=d**-0.5,
        block_size=bs,
        decode_context_lens=torch.tensor(lens, dtype=torch.long),
    )
    q = torch.randn(len(lens), hkv * group, d, generator=g)
    k = torch.randn(len(lens), hkv, d, generator=g)
    v = torch.randn(len(lens), hkv, d, generator=g)
    return q, k, v, kc, vc, meta


@pytest.mark.parametrize("lens", [[1], [211], [5, 17, 200, 64], [16, 32, 33]])
def test_paged_decode_attention_is_sdpas(monkeypatch, lens) -> None:
    _use(monkeypatch, None)
    if not cpu_kernels.available("attention"):
        pytest.skip(f"our kernels cannot run here: {cpu_kernels.why_not()}")
    q, k, v, kc, vc, meta = _step(lens)
    ours, _ = TorchAttentionBackend().forward(q, k, v, kc.clone(), vc.clone(), meta)
    _use(monkeypatch, "none")
    assert not cpu_kernels.available("attention")
    want, _ = TorchAttentionBackend().forward(q, k, v, kc.clone(), vc.clone(), meta)
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-6)


def test_bad_input_is_refused_not_read_out_of_bounds(monkeypatch) -> None:
    _use(monkeypatch, None)
    if not cpu_kernels.available("attention"):
        pytest.skip(f"our kernels cannot run here: {cpu_kernels.why_not()}")
    q, _, _, kc, vc, meta = _step([40])
    table, lens = meta.decode_block_table, meta.decode_context_lens
    with pytest.raises(RuntimeError, match="outside its table"):
        cpu_kernels.decode_attention(q, kc, vc, table, lens + 100, 16, 0.125)
    with pytest.raises(RuntimeError, match="outside the cache"):
        cpu_kernels.decode_attention(q, kc, vc, table + 1000, lens, 16, 0.125)
    with pytest.raises(RuntimeError, match="float32"):
        cpu_kernels.decode_attention(q.double(), kc, vc, table, lens, 16, 0.125)


def test_choosing_kernels(monkeypatch) -> None:
    both = {"int4", "attention"}
    cases = [(None, both), ("all", both), ("none", set()), ("int4", {"int4"}),
             (" attention , int4", both)]  # fmt: skip
    for value, want in cases:
        _use(monkeypatch, value)
        assert cpu_kernels.chosen() == want
    _use(monkeypatch, "int4,flash")
    with pytest.raises(ValueError, match="unknown kernels \\['flash'\\]"):
        cpu_kernels.chosen()


def test_one_library_a_process(monkeypatch, tmp_path) -> None:
    """Another SPLITSERVE_HOME later in the same process reuses the loaded library: loading a
    second build would register the ops twice and abort the process."""
    _use(monkeypatch, None)
    if not cpu_kernels.available("attention"):
        pytest.skip(f"our kernels cannot run here: {cpu_kernels.why_not()}")
    monkeypatch.setenv("SPLITSERVE_HOME", str(tmp_path))
    monkeypatch.setattr(cpu_kernels, "_state", {})
    assert cpu_kernels.available("int4")
    assert not (tmp_path / "kernels").exists()
