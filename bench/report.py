"""What every benchmark's report shares: the machine line and the JSON file."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path


def cuda_name() -> str:
    """The CUDA cards a report names: how many, their name and memory."""
    import torch

    p = torch.cuda.get_device_properties(0)
    return f"{torch.cuda.device_count()} x {p.name} ({p.total_memory / 2**30:.0f} GiB)"


def machine(extra: str = "") -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    parts = [cpu, f"{os.cpu_count()} cores"]
    try:
        import torch

        parts.append(f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    except ImportError:
        pass
    if extra:
        parts.append(extra)
    parts.append(f"Python {platform.python_version()}")
    return ", ".join(parts)


def write_report(
    path: Path | None, bench: str, argv: list[str] | None, results: list, summary: dict, **extra
) -> None:
    """{"bench", "machine", "date", "command", "results", "summary"} (+ extra keys) to path."""
    if path is None:
        return
    report = {
        "bench": bench,
        "machine": machine(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(["python", f"bench/{bench}.py", *(argv or sys.argv[1:])]),
        **extra,
        "results": results,
        "summary": summary,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
