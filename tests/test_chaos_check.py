"""The chaos benchmark's token check (bench/chaos_check.py): what it calls wrong, duplicated
and missing, so that its zeros mean something; and its command line answers --help."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench.chaos_check import TokenCheck, compare

REF = list(range(10, 30))  # twenty distinct tokens


@pytest.mark.parametrize(
    ("received", "expected"),
    [
        (REF, TokenCheck()),
        # A resumption that sent the last three delivered tokens again, then went on right.
        (REF[:8] + REF[5:8] + REF[8:], TokenCheck(duplicated=3)),
        # Twice: one token after the 4th, two after the 12th.
        (REF[:4] + REF[3:4] + REF[4:12] + REF[10:12] + REF[12:], TokenCheck(duplicated=3)),
        # The whole stream sent once more at the end.
        (REF + REF[-4:], TokenCheck(duplicated=4)),
        # One token skipped: everything after it is off by one, and one is missing.
        (REF[:6] + REF[7:], TokenCheck(wrong=13, missing=1)),
        # One token replaced.
        ([*REF[:6], 999, *REF[7:]], TokenCheck(wrong=1)),
        # Tokens past the reference's end that repeat nothing.
        ([*REF, 998, 999], TokenCheck(wrong=2)),
        # A stream cut short (a failed request): only missing.
        (REF[:5], TokenCheck(missing=15)),
        ([], TokenCheck(missing=20)),
    ],
)
def test_compare(received, expected):
    assert compare(received, REF) == expected


def test_a_reference_that_repeats_itself_is_not_a_duplicate():
    ref = [1, 2, 2, 3, 3, 3, 4]
    assert compare(ref, ref).exact
    assert compare([1, 2, 2, 2, 3, 3, 3, 4], ref) == TokenCheck(duplicated=1)


def test_token_texts_compare_like_ids():
    ref = [" the", " cat", " sat"]
    assert compare([" the", " cat", " cat", " sat"], ref) == TokenCheck(duplicated=1)
    assert compare([" the", " dog", " sat"], ref) == TokenCheck(wrong=1)


def test_chaos_bench_help():
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "bench/chaos.py", "--help"], cwd=root,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    for flag in ("--quick", "--json", "--faults", "--soak", "--soak-s"):
        assert flag in out.stdout


def _row(fault: str, **kw) -> dict:
    base = {"fault": fault, "ran": True, "sent": 4, "failed": 0, "resumed": 1.0,
            "wrong_tokens": 0, "duplicated_tokens": 0, "recovery_s": 2.5}  # fmt: skip
    return {**base, **kw}


def test_a_fuzz_fault_without_its_module_is_not_run_never_zero(monkeypatch):
    import asyncio

    from bench import chaos

    monkeypatch.setattr(chaos, "FUZZ_MODULE", "bench.no_such_fuzz_module")
    row = asyncio.run(chaos.run_fuzz(None, [], chaos.QUICK))  # returns before any system use
    assert row["ran"] is False and "no_such_fuzz_module" in row["why"]
    s = chaos.summarize([_row("none", recovery_s=None), _row("decode_death"), row])
    assert s["fuzz_5xx"] is None and s["faults_not_run"] == ["fuzz"]
    assert s["recovery_s_max"] == 2.5 and s["resumed_requests"] == 2.0
    ran = _row("fuzz", fuzz_5xx=0)
    assert chaos.summarize([_row("decode_death"), ran])["fuzz_5xx"] == 0
    # A fault after which no fresh request succeeded has no recovery time, and says so.
    assert chaos.summarize([_row("decode_death", recovery_s=None)])["recovery_s_max"] is None
