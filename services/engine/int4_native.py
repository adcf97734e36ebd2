"""The int4 kernel of int4_kernel.cpp: built once per machine with the system's C++ compiler
against this torch, cached, and loaded as the op `torch.ops.splitserve_int4.linear`.

It needs AVX2 with FMA and F16C (most x86-64 CPUs since 2015; with AVX-512 VNNI it takes the
faster path) and a g++; where either is missing, or the build fails, or
SPLITSERVE_INT4_KERNEL=torch, 4-bit weights use torch's own int4 kernel instead (bfloat16
activations). SPLITSERVE_INT4_MARCH sets g++'s -march (default native; e.g. x86-64-v3 builds
the AVX2 path on an AVX-512 machine). The build takes ~10 s, and
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

SOURCE = Path(__file__).with_name("int4_kernel.cpp")
NEEDS = ("avx2", "fma", "f16c")  # the AVX2 path; AVX-512 VNNI is used where -march has it
ENV = "SPLITSERVE_INT4_KERNEL"  # "torch": torch's kernel even where ours builds
MARCH_ENV = "SPLITSERVE_INT4_MARCH"
BUILD_TIMEOUT_S = 600  # a compile on two busy cores, never a hang

_lock = threading.Lock()
_state: dict[str, object] = {}


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


def why_not() -> str | None:
    """Why this machine cannot run the kernel, or None when it can (before building it)."""
    if os.environ.get(ENV, "").lower() == "torch":
        return f"{ENV}=torch"
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
    parts = [SOURCE.read_text(), torch.__version__, sys.version, " ".join(flags), _march()]
    parts += cpp_extension.include_paths()
    key = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    return _home() / "kernels" / f"int4-{key}.so"


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
        str(SOURCE), f"-L{lib_dir}", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{lib_dir}",
        "-o", str(tmp),
    ]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    if r.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(r.stderr.strip()[-2000:] or f"g++ exited {r.returncode}")
    tmp.replace(out)


def available() -> bool:
    """Whether the op is loaded (building it first if this machine has not yet)."""
    with _lock:
        if "ok" in _state:
            return bool(_state["ok"])
        reason = why_not()
        if reason is None:
            try:
                path = _library_path()
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path.with_suffix(".lock"), "w") as lock:
                    fcntl.flock(lock, fcntl.LOCK_EX)  # another replica may be building it
                    if not path.exists():
                        log.info("building the int4 CPU kernel (once per machine) into %s", path)
                        _build(path)
                torch.ops.load_library(str(path))
            except (OSError, RuntimeError, subprocess.TimeoutExpired) as e:
                reason = f"its build or load failed: {e}"
        if reason is not None:
            log.warning("4-bit weights use torch's int4 kernel: %s", reason)
        _state["ok"] = reason is None
        _state["why"] = reason
        return reason is None


def linear(x: torch.Tensor, packed: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """x float32 [M, K] times W^T, W = d q + m in groups of 32: float32 [M, N]."""
    return torch.ops.splitserve_int4.linear(x, packed, d, m)
