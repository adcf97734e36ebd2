"""The committed generated modules match the .proto files."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_generated_protos_are_current():
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts/gen_protos.py"), "--check"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr


def test_field_numbers_are_documented_as_permanent():
    for proto in (ROOT / "protos/splitserve/v1").glob("*.proto"):
        assert "Field numbers are forever" in proto.read_text(), proto.name
