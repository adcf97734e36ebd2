"""load_format "gguf": a model's GGUF 4-bit blocks served as they are by the int4 CPU kernel."""

from __future__ import annotations

import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.engine.errors import ModelLoadError
from services.engine.int4_weight import Int4Weight, Int8Weight, linear, q4_groups, q8_groups
from services.engine.sampling_params import SamplingParams
from services.model_prep.gguf_convert import convert_gguf
from tests.test_gguf_pull import write_gguf

Q4_0, Q4_1 = gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1
Q8_0 = gguf.GGMLQuantizationType.Q8_0


@pytest.mark.parametrize("kind", [Q4_0, Q4_1])
def test_blocks_decode_to_ggufs_own_values(kind) -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((6, 96)).astype(np.float32)
    blocks = gguf.quants.quantize(a, kind)
    q, scale, zero = q4_groups(blocks, kind.name)
    assert q.shape == (6, 96) and scale.shape == zero.shape == (6, 3)
    assert int(q.min()) >= 0 and int(q.max()) <= 15
    ours = (q.double().view(6, 3, 32) - 8) * scale.double()[..., None] + zero.double()[..., None]
    want = gguf.quants.dequantize(blocks, kind).astype(np.float64)
    np.testing.assert_allclose(ours.view(6, 96).numpy(), want, rtol=1e-6, atol=1e-6)


def test_int4_linear_is_the_groups_matrix_in_bfloat16() -> None:
    g = torch.Generator().manual_seed(0)
    n, k = 96, 128
    q = torch.randint(0, 16, (n, k), generator=g)
    scale = torch.rand(n, k // 32, generator=g) * 0.1
    zero = torch.randn(n, k // 32, generator=g) * 0.1
    w = Int4Weight.from_groups(q, scale, zero)
    s, z = scale.bfloat16().float(), zero.bfloat16().float()
    dense = ((q.float().view(n, -1, 32) - 8) * s[..., None] + z[..., None]).view(n, k)
    x = torch.randn(5, k, generator=g)
    bias = torch.randn(n, generator=g)
    got = linear(x, w, bias)
    want = x.bfloat16().float() @ dense.t() + bias
    assert got.dtype == torch.float32 and got.shape == (5, n)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    # a float matrix goes through F.linear unchanged
    assert torch.equal(linear(x, dense, bias), torch.nn.functional.linear(x, dense, bias))
    with pytest.raises(ValueError, match="K % 32"):
        Int4Weight.from_groups(q[:, :40], scale[:, :1], zero[:, :1])
    with pytest.raises(ValueError, match="N % 16"):
        Int4Weight.from_groups(q[:40], scale[:40], zero[:40])


def test_q8_0_as_two_nibble_planes_is_the_files_matrix() -> None:
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
    got = linear(x, w)
    exact = x.double() @ torch.from_numpy(want).double().t()
    # bfloat16 activations and scales: within a few parts in a thousand of the file's product
    scale = exact.abs().max()
    assert float((got.double() - exact).abs().max() / scale) < 1e-2


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


def test_engine_serves_the_gguf_blocks_close_to_float32(q4_model: Path) -> None:
    """The float32 engine runs the dequantized values of the very same blocks, so the only
    difference is the kernel's bfloat16 activations and scales: logits agree closely, and the
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


def test_gguf_greedy_generation_runs_to_the_end(q4_model: Path) -> None:
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
