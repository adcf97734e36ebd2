"""The engine's own CPU kernels, built once per machine with the system's C++ compiler against
this torch, cached, and loaded as ops under `torch.ops.splitserve_cpu`:
- `int4_linear` (int4_kernel.cpp): 4-bit weights against int16 activations (int4_weight.py);
- `decode_attention` (decode_attention_cpu.cpp): decode over the paged cache (attention_cpu.py).

They need AVX2 with FMA and F16C (most x86-64 CPUs since 2015; the int4 kernel takes a faster
path with AVX-512 VNNI) and a g++. Where either is missing or the build fails, the engine uses
torch's ops instead, and says why once. SPLITSERVE_CPU_KERNELS picks: "all" (the default),
"none", or a comma list of "int4" and "attention". SPLITSERVE_CPU_MARCH sets g++'s -march
(default native; x86-64-v3 builds the AVX2 path on an AVX-512 machine). The build takes ~10 s, and
once a machine: the library is kept under $SPLITSERVE_HOME/kernels, named by what it was built
from (source, torch, Python, CPU), and a lock keeps concurrent replicas from building it twice.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = tuple(
    Path(__file__).with_name(f) for f in ("int4_kernel.cpp", "decode_attention_cpu.cpp")
)
KERNELS = ("int4", "attention")
NEEDS = ("avx2", "fma", "f16c")  # the AVX2 path; AVX-512 VNNI is used where -march has it
ENV = "SPLITSERVE_CPU_KERNELS"
MARCH_ENV = "SPLITSERVE_CPU_MARCH"
BUILD_TIMEOUT_S = 600  # a compile on two busy cores, never a hang

_lock = threading.Lock()
_state: dict[str, object] = {}
# The library this process loaded, if any. A second one (another SPLITSERVE_HOME, another
# -march) would register the same ops again, which aborts the process: never load two.
_library: list[Path] = []


def _home() -> Path:
    # the same place as splitserve.models_pull.splitserve_home (the engine does not import it)
    return Path(os.environ.get("SPLITSERVE_HOME") or "~/.cache/splitserve").expanduser()


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def chosen() -> set[str]:
    """The kernels SPLITSERVE_CPU_KERNELS asks for."""
    v = os.environ.get(ENV, "all").strip().lower()
    if v in ("", "all"):
        return set(KERNELS)
    if v == "none":
        return set()
    picked = {x.strip() for x in v.split(",") if x.strip()}
    unknown = picked - set(KERNELS)
    if unknown:
        raise ValueError(f"{ENV}: unknown kernels {sorted(unknown)} (all, none, or of {KERNELS})")
    return picked


def why_not() -> str | None:
    """Why this machine cannot run the kernels, or None when it can (before building them)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"not x86-64 ({platform.machine()})"
    missing = [f for f in NEEDS if f not in _cpu_flags()]
    if missing:
        return f"the CPU lacks {', '.join(missing)}"
    if shutil.which("g++") is None:
        return "no g++ on PATH"
    return None


def _library_path() -> Path:
    from torch.utils import cpp_extension

    flags = sorted(f for f in _cpu_flags() if f.startswith(("avx", "f16c", "fma")))
    parts = [*(f.read_text() for f in SOURCES), torch.__version__, sys.version, " ".join(flags)]
    parts.append(_march())
    parts += cpp_extension.include_paths()
    key = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    return _home() / "kernels" / f"cpu-{key}.so"


def _march() -> str:
    return os.environ.get(MARCH_ENV) or "native"


def _build(out: Path) -> None:
    from torch.utils import cpp_extension

    lib_dir = cpp_extension.library_paths()[0]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    cmd = [
        "g++", "-O3", f"-march={_march()}", "-std=c++17", "-fopenmp", "-shared", "-fPIC",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-w",
        *(f"-I{p}" for p in cpp_extension.include_paths()),
        *(str(f) for f in SOURCES), f"-L{lib_dir}", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{lib_dir}",
        "-o", str(tmp),
    ]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    if r.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(r.stderr.strip()[-2000:] or f"g++ exited {r.returncode}")
    tmp.replace(out)


def available(kernel: str) -> bool:
    """Whether `kernel` ("int4" or "attention") is chosen and loaded (building the library
    first if this machine has not yet). Read at every layer: both answers are kept."""
    if "chosen" not in _state:
        _state["chosen"] = chosen()
    return kernel in _state["chosen"] and _loaded()


def prepare() -> None:
    """Check SPLITSERVE_CPU_KERNELS (ValueError if it names no kernel of ours) and build and
    load the library if it asks for any."""
    if chosen():
        _loaded()


def _loaded() -> bool:
    with _lock:
        if "ok" in _state:
            return bool(_state["ok"])
        reason = why_not()
        if reason is None and not _library:
            try:
                path = _library_path()
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path.with_suffix(".lock"), "w") as lock:
                    fcntl.flock(lock, fcntl.LOCK_EX)  # another replica may be building it
                    if not path.exists():
                        log.info("building the CPU kernels (once per machine) into %s", path)
                        _build(path)
                torch.ops.load_library(str(path))
                _library.append(path)
            except (OSError, RuntimeError, subprocess.TimeoutExpired) as e:
                reason = f"its build or load failed: {e}"
        if reason is not None:
            log.warning("the engine's CPU kernels are off, torch's ops serve: %s", reason)
        _state["ok"] = reason is None
        _state["why"] = reason
        return reason is None


def int4_linear(
    x: torch.Tensor, packed: torch.Tensor, d: torch.Tensor, m: torch.Tensor
) -> torch.Tensor:
    """x float32 [M, K] times W^T, W = d q + m in groups of 32: float32 [M, N]."""
    return torch.ops.splitserve_cpu.int4_linear(x, packed, d, m)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    table: torch.Tensor,
    lens: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """One query a sequence over its paged context: q [B, H, D] -> [B, H, D]."""
    return torch.ops.splitserve_cpu.decode_attention(
        q, k_cache, v_cache, table, lens, block_size, scale
    )
