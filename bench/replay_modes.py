"""Colocated against disaggregated, as a user would compare them: `splitserve up` serving the
tiny model as `tiny-colocated` or `tiny-disaggregated` (an application YAML: the private Redis,
Ray Serve, the router), the Azure conversation excerpt replayed by `splitserve bench goodput`,
goodput side by side.

By default each mode gets its own `splitserve up`, alone on the machine. `--shared` (and
`--quick`) serves both from one `up` (one model entry per mode), which starts once but leaves
the idle mode's replicas beside the measured one. A warm-up request waits for each model; the
goodput search runs in its own process and writes its report and plots under OUT/<mode>/. Both
searches use the same requests, SLOs and probe rates.

    python bench/replay_modes.py [--quick] [--json PATH] [--out DIR]

Summary keys: goodput_colocated_rps, goodput_disaggregated_rps, ratio (disaggregated /
colocated), send_lag_p99_ms (the generator's worst probe: above 5 ms it, not the server, was
late).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import write_report
from bench.up_process import free_port, splitserve_up

MODES = ("colocated", "disaggregated")


def wait_ready(url: str, model: str, limit_s: float = 120.0) -> None:
    body = json.dumps({"model": model, "prompt": "hi", "max_tokens": 2}).encode()
    deadline = time.monotonic() + limit_s
    while True:
        req = urllib.request.Request(
            url + "/v1/completions", body, {"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                if r.status == 200:
                    return
        except OSError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.5)


def app_config(path: Path, modes: tuple[str, ...]) -> Path:
    """The tiny preset in these modes behind one router, auth off (loopback only)."""
    models = "".join(f"  - {{name: tiny-{m}, path: tiny, mode: {m}}}\n" for m in modes)
    path.write_text(
        f"http: {{host: 127.0.0.1, port: {free_port()}}}\n"
        f"grpc: {{host: 127.0.0.1, port: {free_port()}}}\n"
        f"auth: {{enabled: false}}\nmodels:\n{models}"
    )
    return path


def goodput(url: str, mode: str, out: Path, args: argparse.Namespace) -> dict:
    tok = Path.home() / ".cache" / "splitserve" / "models" / "preset-tiny"
    cmd = [sys.executable, "-m", "splitserve.cli", "bench", "goodput",
           "--url", url + "/v1", "--model", f"tiny-{mode}", "--tokenizer", str(tok),
           "--trace", "azure-conv", "--requests", str(args.requests),
           "--max-prompt-tokens", "1024", "--max-output-tokens", "64",
           "--slo-ttft", str(args.slo_ttft), "--slo-tpot", str(args.slo_tpot),
           "--attainment", "0.9", "--low", str(args.low), "--high", str(args.high),
           "--repeats", str(args.repeats), "--max-probes", str(args.max_probes),
           "--tolerance", "0.1",
           "--quiet", "--out", str(out)]  # fmt: skip
    # The generator and the server share this machine's cores: a raised priority keeps the
    # schedule on time (the generator's own work is small), so a late reply is the server's.
    subprocess.run(cmd, check=True, preexec_fn=_raise_priority)
    return json.loads((out / "report.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="16 requests, 2 probes a mode")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--shared", action="store_true", help="both modes behind one splitserve up")
    ap.add_argument("--out", type=Path, default=Path("/tmp/splitserve-replay"))
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--low", type=float, default=2.0)
    ap.add_argument("--high", type=float, default=16.0)
    ap.add_argument("--max-probes", type=int, default=7)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--slo-ttft", type=float, default=200.0, help="ms")
    ap.add_argument("--slo-tpot", type=float, default=30.0, help="ms")
    args = ap.parse_args()
    if args.quick:
        args.requests, args.max_probes = 16, 2
    results, gp, lag = [], {}, 0.0
    groups = [MODES] if args.shared or args.quick else [(m,) for m in MODES]
    reports = {}
    with tempfile.TemporaryDirectory() as tmp:
        for modes in groups:
            with splitserve_up("--config", str(app_config(Path(tmp) / "app.yaml", modes))) as url:
                for mode in modes:
                    wait_ready(url, f"tiny-{mode}")
                reports |= {mode: goodput(url, mode, args.out / mode, args) for mode in modes}
    for mode, rep in reports.items():
        gp[mode] = rep["goodput_rps"]
        for p in rep["probes"]:
            s = p["summaries"][0]
            lag = max(lag, s["send_lag_s"]["p99"] or 0.0)
            results.append({
                "mode": mode, "rate_rps": p["rate"], "attainment": p["attainment"],
                "achieved_rps": s.get("throughput", {}).get("requests_per_s"),
                "ttft_p90_ms": _ms(s, "ttft_s", "p90"), "tpot_p90_ms": _ms(s, "tpot_s", "p90"),
                "send_lag_p99_ms": 1e3 * (s["send_lag_s"]["p99"] or 0.0),
            })  # fmt: skip
        print(f"{mode}: goodput {gp[mode]:.2f} req/s (converged: {rep['converged']})", flush=True)
    ratio = gp["disaggregated"] / gp["colocated"] if gp["colocated"] else float("inf")
    summary = {
        "goodput_colocated_rps": gp["colocated"],
        "goodput_disaggregated_rps": gp["disaggregated"],
        "ratio": ratio,
        "send_lag_p99_ms": lag * 1e3,
        "shared": bool(args.shared or args.quick),
    }
    print(json.dumps(summary), flush=True)
    write_report(args.json, "replay_modes", None, results, summary)


def _raise_priority() -> None:
    with contextlib.suppress(PermissionError):  # not root: normal priority; send lag tells
        os.nice(-10)


def _ms(s: dict, key: str, q: str) -> float | None:
    v = s.get(key, {}).get(q)
    return None if v is None else v * 1e3


if __name__ == "__main__":
    main()
