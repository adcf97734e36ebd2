"""What a request gets for the sampling it leaves unset: built-in values, under the model's
generation_config.json, under the app config's `sampling`; and the chat cap on max_tokens."""

from __future__ import annotations

import json

import pytest

from router.openai_api import parse, plan
from services.engine.errors import InvalidRequestError
from services.engine.sampling_params import SamplingDefaults
from splitserve.app_config import ConfigError, parse_config


def model_dir(tmp_path, generation: dict | None):
    if generation is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(generation))
    return tmp_path


def test_the_model_generation_config_fills_what_it_has(tmp_path):
    assert SamplingDefaults.from_model_dir(model_dir(tmp_path, None)) == SamplingDefaults()
    d = model_dir(tmp_path, {"eos_token_id": 2, "temperature": 0.7, "top_p": 0.8, "top_k": 20,
                             "repetition_penalty": 1.05, "max_new_tokens": 300})  # fmt: skip
    got = SamplingDefaults.from_model_dir(d)
    assert (got.temperature, got.top_p, got.top_k, got.repetition_penalty) == (0.7, 0.8, 20, 1.05)
    assert (got.max_tokens, got.min_p) == (300, 0.0)  # min_p: unsaid, built-in


def test_do_sample_false_means_greedy_as_in_transformers(tmp_path):
    d = model_dir(tmp_path, {"do_sample": False, "top_p": 0.9})
    got = SamplingDefaults.from_model_dir(d)
    assert got.temperature == 0.0 and got.top_p == 0.9


def test_bad_generation_configs_say_which_file(tmp_path):
    (tmp_path / "generation_config.json").write_text("{")
    with pytest.raises(InvalidRequestError, match=r"generation_config\.json is not valid JSON"):
        SamplingDefaults.from_model_dir(tmp_path)
    model_dir(tmp_path, {"temperature": -1})
    with pytest.raises(InvalidRequestError, match=r"generation_config\.json: temperature must be"):
        SamplingDefaults.from_model_dir(tmp_path)


def test_the_app_config_wins_over_the_model(tmp_path):
    d = model_dir(tmp_path, {"temperature": 0.7, "top_p": 0.8})
    spec = {"name": "m", "path": "p", "sampling": {"temperature": 0.2, "max_tokens": 64}}
    cfg = parse_config({"models": [spec]})
    got = cfg.models[0].sampling.over(d)
    assert (got.temperature, got.top_p, got.max_tokens) == (0.2, 0.8, 64)


@pytest.mark.parametrize(
    ("sampling", "message"),
    [
        ({"temperature": -0.5}, "models.0.sampling.temperature: temperature must be >= 0"),
        ({"max_tokens": 0}, "models.0.sampling.max_tokens: max_tokens must be a positive"),
        ({"top_p": 0}, "models.0.sampling.top_p: top_p must be in (0, 1]"),
        ({"seed": 1}, "models.0.sampling.seed: Extra inputs are not permitted"),
    ],
)
def test_bad_sampling_settings_name_the_field(sampling, message):
    with pytest.raises(ConfigError) as ei:
        parse_config({"models": [{"name": "m", "path": "p", "sampling": sampling}]})
    assert message in str(ei.value)


def _plan(body: dict, defaults: SamplingDefaults | None, max_model_len: int = 100):
    kind = "chat" if "messages" in body else "completion"
    req = parse(kind, json.dumps({"model": "m", **body}).encode())
    return plan(kind, req, [list(range(1, 41))], max_model_len, defaults)


def test_unset_fields_take_the_defaults_set_ones_win():
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    d = SamplingDefaults(max_tokens=30, temperature=0.0, top_k=5)
    p = _plan(chat, d).subs[0].params
    assert (p.max_tokens, p.temperature, p.top_k, p.top_p) == (30, 0.0, 5, 1.0)
    p = _plan({**chat, "temperature": 0.9, "top_k": -1, "max_tokens": 4}, d).subs[0].params
    assert (p.max_tokens, p.temperature, p.top_k) == (4, 0.9, -1)
    # The chat cap never asks for more than the context holds (40 prompt tokens of 100).
    assert _plan(chat, SamplingDefaults(max_tokens=500)).subs[0].params.max_tokens == 60
    # Completions keep the API's default of 16 whatever the cap.
    assert _plan({"prompt": "x"}, d).subs[0].params.max_tokens == 16
