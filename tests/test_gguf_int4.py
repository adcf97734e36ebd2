"""load_format "gguf": a model's GGUF 4-bit blocks served as they are by an int4 CPU kernel, ours
(AVX-512 VNNI, int8 activations) or torch's (bfloat16 activations): both are checked."""

from __future__ import annotations

import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from services.engine import cpu_kernels
from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.engine.errors import ModelLoadError
from services.engine.int4_weight import Int4Weight, Int8Weight, linear, q4_groups, q8_groups
from services.engine.sampling_params import SamplingParams
from services.model_prep.gguf_convert import convert_gguf
from tests.test_gguf_pull import write_gguf

Q4_0, Q4_1 = gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1
Q8_0 = gguf.GGMLQuantizationType.Q8_0


@pytest.fixture(params=["ours", "torch"])
def kernel(request, monkeypatch) -> str:
    """Which int4 kernel the weights made in the test use."""
    monkeypatch.setattr(cpu_kernels, "_state", {})
    if request.param == "torch":
        monkeypatch.setenv(cpu_kernels.ENV, "attention")
    else:
        monkeypatch.delenv(cpu_kernels.ENV, raising=False)
        if cpu_kernels.why_not() is not None:
            pytest.skip(f"our kernel cannot run here: {cpu_kernels.why_not()}")
    assert cpu_kernels.available("int4") == (request.param == "ours")
    return request.param


@pytest.mark.parametrize("kind", [Q4_0, Q4_1])
def test_blocks_decode_to_ggufs_own_values(kind) -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((6, 96)).astype(np.float32)
    blocks = gguf.quants.quantize(a, kind)
    q, d, m = q4_groups(blocks, kind.name)
    assert q.shape == (6, 96) and d.shape == m.shape == (6, 3)
    assert int(q.min()) >= 0 and int(q.max()) <= 15
    ours = q.double().view(6, 3, 32) * d.double()[..., None] + m.double()[..., None]
    want = gguf.quants.dequantize(blocks, kind).astype(np.float64)
    np.testing.assert_allclose(ours.view(6, 96).numpy(), want, rtol=1e-6, atol=1e-6)


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max())


@pytest.mark.parametrize("k", [128, 576])  # groups in fours only, and a last pair of groups
def test_int4_linear_is_the_groups_matrix(kernel, k) -> None:
    g = torch.Generator().manual_seed(0)
    n = 96
    q = torch.randint(0, 16, (n, k), generator=g)
    d = (torch.rand(n, k // 32, generator=g) * 0.1).half().float()
    m = (torch.randn(n, k // 32, generator=g) * 0.1).half().float()
    dense = (q.float().view(n, -1, 32) * d[..., None] + m[..., None]).view(n, k)
    w = Int4Weight.from_groups(q, d, m)
    assert (w.offsets is not None) == (kernel == "ours")
    bias = torch.randn(n, generator=g)
    # every row count the kernel unrolls (1..8) and more than one block of 8
    for rows in (1, 2, 3, 5, 7, 8, 9, 19):
        x = torch.randn(rows, k, generator=g)
        got = linear(x, w, bias)
        assert got.dtype == torch.float32 and got.shape == (rows, n)
        # int8 or bfloat16 activations: within a percent of the largest output
        assert _rel_err(got, x.double() @ dense.double().t() + bias.double()) < 1e-2
    # a NaN in x comes out as NaN in every output of its row, never as integer garbage
    x = torch.randn(2, k, generator=g)
    x[1, 3] = float("nan")
    y = linear(x, w)
    assert torch.isfinite(y[0]).all() and torch.isnan(y[1]).all()
    # a float matrix goes through F.linear unchanged
    x = torch.randn(5, k, generator=g)
    assert torch.equal(linear(x, dense, bias), torch.nn.functional.linear(x, dense, bias))
    with pytest.raises(ValueError, match="K % 64"):
        Int4Weight.from_groups(q[:, :96], d[:, :3], m[:, :3])
    with pytest.raises(ValueError, match="N % 16"):
        Int4Weight.from_groups(q[:40], d[:40], m[:40])


def test_q8_0_as_two_nibble_planes_is_the_files_matrix(kernel) -> None:
    rng = np.random.default_rng(1)
    a = rng.standard_normal((48, 64)).astype(np.float32)
    blocks = gguf.quants.quantize(a, Q8_0)
    q, d = q8_groups(blocks)
    want = gguf.quants.dequantize(blocks, Q8_0)
    ours = (q.double().view(48, 2, 32) * d.double()[..., None]).view(48, 64).numpy()
    np.testing.assert_allclose(ours, want, rtol=1e-6, atol=1e-6)
    w = Int8Weight.from_groups(q, d)
    assert w.shape == (48, 64)
    x = torch.from_numpy(rng.standard_normal((3, 64)).astype(np.float32))
    exact = x.double() @ torch.from_numpy(want).double().t()
    # int8 or bfloat16 activations: within a percent of the file's product
    assert _rel_err(linear(x, w), exact) < 1e-2


AVX2_CHECK = """
import torch
from services.engine.int4_weight import Int4Weight, linear
g = torch.Generator().manual_seed(0)
for k in (128, 576):
    n = 48
    q = torch.randint(0, 16, (n, k), generator=g)
    d = (torch.rand(n, k // 32, generator=g) * 0.1).half().float()
    m = (torch.randn(n, k // 32, generator=g) * 0.1).half().float()
    dense = (q.double().view(n, -1, 32) * d.double()[..., None] + m.double()[..., None])
    w = Int4Weight.from_groups(q, d, m)
    assert w.offsets is not None, "our kernel did not load"
    for rows in (1, 3, 8, 9):
        x = torch.randn(rows, k, generator=g)
        want = x.double() @ dense.view(n, k).t()
        err = float((linear(x, w).double() - want).abs().max() / want.abs().max())
        assert err < 1e-3, (k, rows, err)
print("ok")
"""


def test_the_avx2_path_of_our_kernel() -> None:
    """The path an AVX2 laptop takes (no AVX-512), built here with -march=x86-64-v3 in a
    process of its own (one process loads one build of the op)."""
    import os
    import subprocess
    import sys

    if cpu_kernels.why_not() is not None:
        pytest.skip(f"our kernel cannot run here: {cpu_kernels.why_not()}")
    env = {**os.environ, cpu_kernels.MARCH_ENV: "x86-64-v3"}
    env.pop(cpu_kernels.ENV, None)
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", AVX2_CHECK], env=env, cwd=root,
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


def test_a_machine_without_our_kernel_says_why(monkeypatch) -> None:
    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setattr(cpu_kernels, "_cpu_flags", lambda: {"avx", "sse4_2"})
    monkeypatch.delenv(cpu_kernels.ENV, raising=False)
    assert cpu_kernels.why_not() == "the CPU lacks avx2, fma, f16c"
    assert not cpu_kernels.available("int4") and not cpu_kernels.available("attention")
    q = torch.randint(0, 16, (16, 64))
    assert Int4Weight.from_groups(q, torch.ones(16, 2), torch.zeros(16, 2)).offsets is None


@pytest.fixture(scope="module")
def q4_model(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model as a llama.cpp GGUF whose matrices are Q4_0 (k), Q8_0 (o and the tied
    embedding) and Q4_1 (the rest),
    pulled as `splitserve models pull` lays it out: converted float32 weights and gguf/."""
    root = tmp_path_factory.mktemp("q4")
    src = root / "tiny.Q4_1.gguf"
    quant = {".attn_k.": Q4_0, ".attn_q.": Q4_1, ".attn_v.": Q4_1, ".attn_output.": Q8_0}
    write_gguf(tiny_model_dir, src, quant=quant | {".ffn_": Q4_1, "token_embd": Q8_0})
    out = convert_gguf(src, root / "model")
    (out / "gguf").mkdir()
    shutil.copy(src, out / "gguf" / src.name)
    return out


def _engine(model_dir: Path, load_format: str) -> LLMEngine:
    return LLMEngine(model_dir, EngineConfig(load_format=load_format, num_kv_blocks=64), seed=0)


def test_engine_serves_the_gguf_blocks_close_to_float32(q4_model: Path, kernel) -> None:
    """The float32 engine runs the dequantized values of the very same blocks, so the only
    difference is the kernel's int8 or bfloat16 activations: logits agree closely, and the
    4-bit matrices really are served as such (permuted q/k rows included)."""
    fp, q4 = _engine(q4_model, "auto"), _engine(q4_model, "gguf")
    w = q4.runner.model.w
    lw = w.layers[0]
    assert all(isinstance(m, Int4Weight) for m in (lw.qkv, lw.gate_up, lw.down))
    assert isinstance(lw.o_proj, Int8Weight) and isinstance(w.lm_head, Int8Weight)  # tied
    assert isinstance(w.embed, torch.Tensor) and w.embed.shape == (2048, 64)
    prompt = list(range(3, 40))
    logits = []
    for e in (fp, q4):
        ids = torch.tensor(prompt)
        e.add_request("r", prompt, SamplingParams(max_tokens=1, temperature=0.0))
        so = e.scheduler.schedule()
        e.runner.requests.update(so)
        inputs = e.runner.prepare(so)
        logits.append(e.runner.model.forward(*inputs[:3], e.runner.kv_cache, None))
        assert logits[-1].shape == (len(ids), 2048)
    err = (logits[0] - logits[1]).abs().max() / logits[0].abs().max()
    assert err < 0.03, err
    top = (logits[0].argmax(-1) == logits[1].argmax(-1)).float().mean()
    assert top >= 0.8, top


def test_gguf_greedy_generation_runs_to_the_end(q4_model: Path, kernel) -> None:
    e = _engine(q4_model, "gguf")
    e.add_request("r", list(range(3, 20)), SamplingParams(max_tokens=12, ignore_eos=True))
    out = []
    while e.has_unfinished():
        out += [t for o in e.step() for t in o.new_token_ids]
    assert len(out) == 12
    e.check_integrity()


def test_gguf_load_format_errors(tiny_model_dir: Path) -> None:
    with pytest.raises(ValueError, match="CPU's float32 path only"):
        EngineConfig(load_format="gguf", device="cuda")
    with pytest.raises(ValueError, match="CPU's float32 path only"):
        EngineConfig(load_format="gguf", dtype="bfloat16")
    with pytest.raises(ValueError, match="auto, dummy or gguf"):
        EngineConfig(load_format="q4")
    with pytest.raises(ModelLoadError, match="0 GGUF files in gguf/"):
        _engine(tiny_model_dir, "gguf")


def test_smollm2_q4_1_answers_like_float32(smollm2_dir: Path) -> None:
    """The shipped Q4_1 file served 4-bit still knows the capital of France."""
    e = _engine(smollm2_dir, "gguf")
    ids = e.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}]
    )
    e.add_request("r", ids, SamplingParams(max_tokens=12, temperature=0.0))
    out = []
    while e.has_unfinished():
        out += [t for o in e.step() for t in o.new_token_ids]
    assert "Paris" in e.tokenizer.decode(out)
