"""Regenerate the committed Python modules from protos/splitserve/v1/*.proto.

    python scripts/gen_protos.py          # rewrite them
    python scripts/gen_protos.py --check  # exit 1 if any is stale (the test suite runs this)

Paths are rooted at the repository so the modules import as protos.splitserve.v1.*_pb2.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = ROOT / "protos" / "splitserve" / "v1"


def generate(out_root: Path) -> list[Path]:
    from grpc_tools import protoc

    protos = sorted(PROTO_DIR.glob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{ROOT}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *[str(p.relative_to(ROOT)) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted((out_root / "protos/splitserve/v1").glob("*_pb2*.py*"))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        stale = []
        for f in generate(Path(tmp)):
            target = PROTO_DIR / f.name
            if args.check:
                if not target.exists() or target.read_bytes() != f.read_bytes():
                    stale.append(target.relative_to(ROOT))
            else:
                target.write_bytes(f.read_bytes())
        if stale:
            print(
                "stale generated protos: " + ", ".join(map(str, stale)) + "; run "
                "python scripts/gen_protos.py",
                file=sys.stderr,
            )
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
