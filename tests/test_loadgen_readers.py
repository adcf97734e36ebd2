"""Trace readers on the shipped excerpts (row counts and first rows pinned), BurstGPT's schema,
and bad files: each error names the file and the line."""

from __future__ import annotations

import hashlib

import pytest

from loadgen.readers import SHIPPED, SHIPPED_DIR, read_trace, resolve
from loadgen.trace import TraceError, TraceRequest


def test_shipped_excerpts_are_the_documented_bytes():
    # traces/README.md lists these digests; an edited excerpt would no longer be the upstream's.
    readme = (SHIPPED_DIR / "README.md").read_text()
    for name in SHIPPED.values():
        digest = hashlib.sha256((SHIPPED_DIR / name).read_bytes()).hexdigest()
        assert f"{digest}  {name}" in readme


def test_azure_conv_excerpt():
    tr = read_trace("azure-conv")
    assert len(tr) == 1000
    # Rows 1-3 of AzureLLMInferenceTrace_conv.csv: 18:15:46.6805900,374,44 / 18:15:50.9951690,
    # 396,109 / 18:15:51.2224670,879,55; times are relative to the first, to 100 ns.
    assert tr.requests[0] == TraceRequest(0.0, 374, 44)
    assert tr.requests[1].arrival_s == pytest.approx(4.314579, abs=1e-6)
    assert (tr.requests[1].prompt_tokens, tr.requests[1].output_tokens) == (396, 109)
    assert tr.requests[2].arrival_s == pytest.approx(4.541877, abs=1e-6)
    # Last row: 2023-11-16 18:19:22.7079830,309,18
    assert tr.requests[-1].arrival_s == pytest.approx(216.027393, abs=1e-6)
    assert (tr.requests[-1].prompt_tokens, tr.requests[-1].output_tokens) == (309, 18)
    assert tr.block_tokens == 0


def test_azure_code_excerpt():
    tr = read_trace("azure-code")
    assert len(tr) == 1000
    assert tr.requests[0] == TraceRequest(0.0, 4808, 10)
    assert tr.requests[1].arrival_s == pytest.approx(0.052, abs=1e-6)  # 04.0319600 - 03.9799600
    assert tr.requests[1].prompt_tokens == 3180


def test_mooncake_excerpts():
    tr = read_trace("mooncake-conversation")
    assert len(tr) == 300
    assert tr.block_tokens == 512
    first = tr.requests[0]
    assert (first.arrival_s, first.prompt_tokens, first.output_tokens) == (0.0, 6758, 500)
    assert first.hash_ids == tuple(range(14))
    # The second shares only block 0 with the first: a common system prompt.
    assert tr.requests[1].hash_ids[:2] == (0, 14)
    assert tr.requests[-1].arrival_s == 102.0  # ms in the file
    syn = read_trace("mooncake-synthetic")
    assert len(syn) == 200
    assert (syn.requests[2].arrival_s, syn.requests[2].prompt_tokens) == (0.040, 23769)


def test_burstgpt_schema(tmp_path):
    # The three rows the BurstGPT README shows, plus a failed request (0 response tokens) and
    # two requests in one second (file order kept). Not real data: a schema check.
    p = tmp_path / "BurstGPT_sample.csv"
    p.write_text(
        "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
        "5,ChatGPT,472,18,490,Conversation log\n"
        "45,ChatGPT,1087,230,1317,Conversation log\n"
        "118,GPT-4,417,276,693,Conversation log\n"
        "120,ChatGPT,100,0,100,API log\n"
        "118,ChatGPT,20,10,30,API log\n"
    )
    tr = read_trace(p)
    assert [(r.arrival_s, r.prompt_tokens, r.output_tokens) for r in tr.requests] == [
        (0.0, 472, 18),
        (40.0, 1087, 230),
        (113.0, 417, 276),
        (113.0, 20, 10),
    ]
    assert tr.requests[2].label("model") == "GPT-4"
    assert tr.requests[3].label("log_type") == "API log"
    assert "1 failed rows" in tr.notes[0]
    assert len(read_trace(p, include_failures=True)) == 5


@pytest.mark.parametrize(
    ("name", "text", "line", "says"),
    [
        (
            "a.csv",
            "TIMESTAMP,ContextTokens,GeneratedTokens\r\n"
            "2023-11-16 18:15:46.6805900,374,44\r\n2023-11-16 18:15:4x,1,2\r\n",
            3,
            "TIMESTAMP",
        ),
        (
            "b.csv",
            "TIMESTAMP,ContextTokens,GeneratedTokens\n"
            "2023-11-16 18:15:46.6805900,374,44\n2023-11-16 18:15:47.0,-3,2\n",
            3,
            "ContextTokens",
        ),
        (
            "c.csv",
            "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.0,1,2\n"
            "2023-11-16 18:15:47.0,1\n",
            3,
            "expected 3 fields",
        ),
        (
            "d.jsonl",
            '{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [0]}\n'
            '{"timestamp": 5, "input_length": 10,\n',
            2,
            "not valid JSON",
        ),
        (
            "e.jsonl",
            '{"timestamp": 0, "input_length": 1000, "output_length": 1, "hash_ids": [0]}\n',
            1,
            "ceil(1000/512) = 2",
        ),
        (
            "f.jsonl",
            '{"timestamp": 0, "input_length": 10, "output_length": 1}\n',
            1,
            "missing field 'hash_ids'",
        ),
        (
            "g.csv",
            "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
            "5,ChatGPT,472,18,491,Conversation log\n",
            2,
            "Total tokens 491",
        ),
        (
            "h.csv",
            "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
            "5,ChatGPT,472,18,490,Conversation log\nsoon,ChatGPT,1,1,2,API log\n",
            3,
            "Timestamp",
        ),
        ("i.csv", "when,what\n1,2\n", 1, "unknown trace format"),
    ],
)
def test_bad_trace_names_the_line(tmp_path, name, text, line, says):
    p = tmp_path / name
    p.write_bytes(text.encode())
    with pytest.raises(TraceError) as e:
        read_trace(p)
    assert e.value.line == line
    assert str(e.value).startswith(f"{p}:{line}: ")
    assert says in str(e.value)


def test_missing_file_lists_shipped_names(tmp_path):
    with pytest.raises(TraceError, match="azure-conv"):
        resolve(tmp_path / "nope.csv")
