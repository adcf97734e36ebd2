"""Bad input gets one clear error: from the library, and from the CLI without a traceback."""

import json
import shutil
import subprocess
import sys

import pytest

from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.engine.errors import InvalidRequestError, ModelLoadError
from services.engine.sampling_params import SamplingParams
from tests.engine_helpers import make_engine


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return make_engine(tiny_model_dir, max_model_len=256, num_kv_blocks=64)


@pytest.mark.parametrize(
    ("prompt", "params", "match"),
    [
        ([], {}, "prompt is empty"),
        ([1] * 256, {}, "prompt has 256 tokens; the context holds 256"),
        ([1] * 10, {"max_tokens": 300}, r"exceeds the context length 256"),
        ([5000], {}, r"outside the vocabulary \[0, 2048\)"),
        ([-1], {}, "outside the vocabulary"),
    ],
)
def test_bad_requests(engine, prompt, params, match):
    with pytest.raises(InvalidRequestError, match=match):
        engine.add_request("x", prompt, SamplingParams(**params))
    assert not engine.has_unfinished()


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"max_tokens": 0}, "max_tokens must be a positive integer"),
        ({"max_tokens": -3}, "max_tokens must be a positive integer"),
        ({"temperature": -0.1}, "temperature must be >= 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"logprobs": 21}, "logprobs must be in"),
        ({"stop": ("",)}, "stop strings must be non-empty"),
    ],
)
def test_bad_sampling_params(params, match):
    with pytest.raises(InvalidRequestError, match=match):
        SamplingParams(**params)


def test_duplicate_request_id(engine):
    engine.add_request("dup", [1, 2, 3], SamplingParams(max_tokens=2))
    with pytest.raises(InvalidRequestError, match="already in use"):
        engine.add_request("dup", [1, 2, 3], SamplingParams(max_tokens=2))
    engine.abort("dup")


def test_request_larger_than_the_kv_cache(tiny_model_dir):
    small = make_engine(tiny_model_dir, num_kv_blocks=4)
    with pytest.raises(InvalidRequestError, match="needs 5 KV blocks at most; this engine has 4"):
        small.add_request("big", [1] * 70, SamplingParams(max_tokens=4))


def test_missing_model_dir(tmp_path):
    with pytest.raises(ModelLoadError, match="model directory not found"):
        LLMEngine(tmp_path / "nope")


def test_truncated_safetensors(tiny_model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    shard = next(broken.glob("*.safetensors"))
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        LLMEngine(broken, EngineConfig(num_kv_blocks=8))


def test_unsupported_architecture(tiny_model_dir, tmp_path):
    other = tmp_path / "gpt2ish"
    shutil.copytree(tiny_model_dir, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"unsupported model architecture.*LlamaForCausalLM"):
        LLMEngine(other)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "splitserve.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_generate_json(tiny_model_dir):
    from services.engine.tokenizer import load_tokenizer

    r = _cli(
        "generate",
        "--model",
        str(tiny_model_dir),
        "--prompt",
        "Hello there",
        "--json",
        "--max-tokens",
        "5",
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["prompt_token_ids"] == load_tokenizer(tiny_model_dir).encode("Hello there")
    assert len(out["token_ids"]) <= 5 and out["finish_reason"] in ("stop", "length")
    assert set(out) == {"text", "token_ids", "prompt_token_ids", "finish_reason"}


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--max-tokens", "0"], "max_tokens must be a positive integer"),
        (["--temperature", "-1"], "temperature must be >= 0"),
        (["--top-p", "2"], "top_p must be in"),
        (["--prompt", ""], "prompt is empty"),
        (["--max-tokens", "5000"], "exceeds the context length"),
    ],
)
def test_cli_errors_are_one_line(tiny_model_dir, args, match):
    base = ["generate", "--model", str(tiny_model_dir), "--prompt", "hi"]
    r = _cli(*base, *args)
    assert r.returncode == 2
    assert match in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_cli_missing_model_dir(tmp_path):
    r = _cli("generate", "--model", str(tmp_path / "nope"), "--prompt", "hi")
    assert r.returncode == 2 and "model directory not found" in r.stderr
    assert "Traceback" not in r.stderr
