"""Chaos: each fault against a running `splitserve up` (the tiny preset, CPU) under a steady
load, and what the clients lost.

Faults, in this order, each under its own stretch of the load (bench.chaos_load: greedy
streamed requests with a presence penalty, half over HTTP and half over gRPC, each checked
token by token against the same request run uninterrupted on a local engine):

  none            the load alone: the baseline (shows the check itself finds nothing)
  redis_flushall  FLUSHALL on up's private Redis server
  redis_restart   SIGKILL up's private Redis server (up starts it again on its port)
  redis_stall     SIGSTOP the Redis server for STALL_S, then SIGCONT: unreachable with its
                  connections open (a hung or partitioned server)
  holder_death    SIGKILL the KV holder: under `up` the prefill replica, whose in-process
                  store shard holds the prompts' blocks until decode has pulled them
  decode_death    SIGKILL the decode replica (Ray Serve starts another; streams continue)
  holder_and_decode_death
                  SIGKILL the holder, then the decode replica: the streams continue on a new
                  decode replica that cannot read their prompts' KV where it was (recomputes)
  fuzz            hostile input under the load, when the fuzzing module (FUZZ_MODULE) is
                  present; otherwise reported as not run, never as zero

A process is found as an operator would find it: a replica by the port it serves on (from the
registry), the Redis server by its port among up's processes. Each fault fires once enough
streams are mid-way, and a fresh probe request is sent after it, again and again, until one
succeeds: the time to recover. Per fault: requests sent (the load and the probes), failed,
resumed (the router's splitserve:requests_resumed_total, its delta), wrong, duplicated and
missing tokens (bench.chaos_check), responses whose text differs from the reference's, time
to recover, and how long until the replicas were registered again.

    python bench/chaos.py --quick --json bench/results/chaos-cpu-quick.json
    python bench/chaos.py --json bench/results/chaos-cpu.json
    python bench/chaos.py --soak --soak-s 1800 --json bench/results/chaos-soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib
import os
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.chaos_load import Client, Job, Load, Outcome, plan_jobs, with_references
from bench.chaos_soak import tree_usage
from bench.chaos_system import System, counter_delta
from bench.report import write_report
from bench.up_process import free_port, up_session

FAULTS = (
    "none", "redis_flushall", "redis_restart", "redis_stall", "holder_death", "decode_death",
    "holder_and_decode_death", "fuzz",
)  # fmt: skip
# The hook for hostile input: a module with run(url, grpc_address, seconds) -> {"requests":
# int, "status_5xx": int} (gRPC's server-side failures count as 5xx). Not present: not run.
FUZZ_MODULE = "bench.chaos_fuzz"
# --quick: one fault of each kind the summary reports on (the baseline, Redis, a replica's
# death, hostile input), to stay within a minute on 2 cores.
QUICK_FAULTS = ("none", "redis_restart", "decode_death", "fuzz")
STALL_S = 5.0


@dataclass(frozen=True)
class Scenario:
    requests: int = 24  # of the load, per fault
    rate: float = 1.0  # requests/s, steady: below what the tiny preset serves on 2 cores
    max_tokens: int = 600
    # A fault fires once trigger_share of its load has been sent and trigger_streams streams
    # have trigger_tokens tokens: in the steady state, with streams mid-way.
    trigger_share: float = 0.5
    trigger_tokens: int = 16
    trigger_streams: int = 2
    trigger_wait_s: float = 60.0
    recover_wait_s: float = 120.0  # probes stop trying after this long
    settle_wait_s: float = 120.0  # the system must be whole again before the next fault
    fuzz_s: float = 20.0
    seed: int = 0


QUICK = Scenario(requests=6, rate=2.0, max_tokens=300, fuzz_s=4.0)


# -- faults --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    name: str
    fire: Callable[[System], tuple[str, Callable[[], bool]]] | None
    # fire: does it; returns what was done and a test of the system being back (replaced
    # replica or registrations restored)


def _kill_role(role: str) -> Callable[[System], tuple[str, Callable[[], bool]]]:
    def fire(system: System):
        pid, rep = system.replica_pid(role)
        os.kill(pid, signal.SIGKILL)
        what = f"SIGKILL pid {pid}: {role} replica {rep.replica_id} at {rep.address}"
        return what, lambda: any(r.replica_id != rep.replica_id for r in system.replicas(role))

    return fire


def _kill_holder_and_decode(system: System):
    """The holder first, then the decode replica: the streams continue on a new decode
    replica, which must read their prompts' KV from a holder that is gone."""
    holder, back_holder = _kill_role("prefill")(system)
    decode, back_decode = _kill_role("decode")(system)
    return f"{holder}; {decode}", lambda: back_holder() and back_decode()


def _registered(system: System) -> Callable[[], bool]:
    return lambda: bool(system.replicas("prefill")) and bool(system.replicas("decode"))


def _kill_redis(system: System):
    pid = system.redis_pid()
    os.kill(pid, signal.SIGKILL)
    return f"SIGKILL pid {pid}: the private Redis server at {system.redis_url}", _registered(system)


def _stall_redis(system: System):
    """SIGSTOP the Redis server for STALL_S, then SIGCONT: unreachable the hard way (its
    connections stay open and nothing answers), as a hung or partitioned server would be."""
    pid = system.redis_pid()
    os.kill(pid, signal.SIGSTOP)
    resumed = threading.Event()

    def cont() -> None:
        os.kill(pid, signal.SIGCONT)
        resumed.set()

    threading.Timer(STALL_S, cont).start()
    what = f"SIGSTOP pid {pid} (the private Redis server) for {STALL_S:g} s, then SIGCONT"
    return what, lambda: resumed.is_set() and _registered(system)()


def _flushall(system: System):
    system.flushall()
    return f"FLUSHALL on {system.redis_url}", _registered(system)


FAULT_TABLE = {
    "none": Fault("none", None),
    "redis_flushall": Fault("redis_flushall", _flushall),
    "redis_restart": Fault("redis_restart", _kill_redis),
    "redis_stall": Fault("redis_stall", _stall_redis),
    "holder_death": Fault("holder_death", _kill_role("prefill")),
    "decode_death": Fault("decode_death", _kill_role("decode")),
    "holder_and_decode_death": Fault("holder_and_decode_death", _kill_holder_and_decode),
}


# -- one fault under load ------------------------------------------------------------------


async def _until(test: Callable[[], bool], t0: float, timeout_s: float) -> float | None:
    """Seconds from t0 until test() holds (polled off the loop); None: not within timeout_s."""
    while time.monotonic() - t0 < timeout_s:
        if await asyncio.to_thread(test):
            return time.monotonic() - t0
        await asyncio.sleep(0.1)
    return None


async def _recover(client: Client, t0: float, timeout_s: float) -> tuple[float | None, int, int]:
    """Fresh requests, one after another, until one succeeds: (seconds from t0, sent, failed)."""
    sent = failed = 0
    while time.monotonic() - t0 < timeout_s:
        sent += 1
        if await client.probe():
            return time.monotonic() - t0, sent, failed
        failed += 1
        await asyncio.sleep(0.2)
    return None, sent, failed


def _tally(outcomes: list[Outcome]) -> dict:
    checks = [o.check() for o in outcomes]
    failed = [o for o in outcomes if not o.ok]
    pairs = list(zip(outcomes, checks, strict=True))
    e2e = [o.done_s - o.sent_s for o in outcomes]
    return {
        "load_requests": len(outcomes),
        "load_failed": len(failed),
        "errors": sorted({o.error for o in failed if o.error})[:5],
        "wrong_tokens": sum(c.wrong for c in checks),
        "duplicated_tokens": sum(c.duplicated for c in checks),
        # A finished request short of its reference lost tokens; a failed one is counted as
        # failed (its missing tail is reported, not added to the losses).
        "missing_tokens": sum(c.missing for o, c in pairs if o.ok),
        "missing_tokens_of_failed": sum(c.missing for o, c in pairs if not o.ok),
        "text_mismatches": sum(1 for o in outcomes if o.ok and not o.text_ok()),
        "tokens_checked": sum(len(o.tokens) for o in outcomes),
        "e2e_s_p50": round(statistics.median(e2e), 3) if e2e else None,
        "e2e_s_max": round(max(e2e, default=0.0), 3),
    }


async def _fire_when_ready(system: System, fault: Fault, load: Load, client: Client,
                           sc: Scenario) -> dict:  # fmt: skip
    """Wait for the trigger (bounded), fire, then time the recovery (probes) and the return of
    what the fault removed (replicas or registrations)."""
    assert fault.fire is not None
    t0 = time.monotonic()

    def ready() -> bool:
        return (
            load.sent >= sc.trigger_share * len(load.jobs)
            and load.mid_stream(sc.trigger_tokens) >= sc.trigger_streams
        )

    while time.monotonic() - t0 < sc.trigger_wait_s and not load.finished() and not ready():
        await asyncio.sleep(0.02)
    trigger_met, in_flight = ready(), len(load.running)
    t_fault = time.monotonic()
    action, back = await asyncio.to_thread(fault.fire, system)
    back_task = asyncio.create_task(_until(back, t_fault, sc.recover_wait_s))
    recovery_s, probes, probes_failed = await _recover(client, t_fault, sc.recover_wait_s)
    back_s = await back_task
    return {
        "action": action,
        "trigger_met": trigger_met,
        "in_flight_at_fault": in_flight,
        "recovery_s": None if recovery_s is None else round(recovery_s, 3),
        "back_s": None if back_s is None else round(back_s, 3),
        "probes": probes,
        "probes_failed": probes_failed,
    }


async def run_fault(system: System, fault: Fault, jobs: list[Job], sc: Scenario) -> dict:
    client = Client(system.url, system.grpc)
    t0 = time.monotonic()
    fired = {"action": None, "recovery_s": None, "back_s": None, "probes": 0, "probes_failed": 0}
    try:
        resumed0 = system.router_counter("splitserve:requests_resumed")
        resume_failed0 = system.router_counter("splitserve:requests_resume_failed")
        recomputed0 = system.replica_counter("splitserve:kv_recomputed_blocks", "decode")
        load = Load(client, jobs, sc.rate)
        load.start()
        if fault.fire is not None:
            fired = await _fire_when_ready(system, fault, load, client, sc)
        outcomes = await load.wait()
        settle_s = await system.wait_whole(sc.settle_wait_s)
        resumed = system.router_counter("splitserve:requests_resumed") - resumed0
        resume_failed = system.router_counter("splitserve:requests_resume_failed") - resume_failed0
        recomputed = counter_delta(
            recomputed0, system.replica_counter("splitserve:kv_recomputed_blocks", "decode")
        )
    finally:
        await client.close()
    t = _tally(outcomes)
    return {
        "fault": fault.name,
        "ran": True,
        "sent": t["load_requests"] + fired["probes"],
        "failed": t["load_failed"] + fired["probes_failed"],
        "resumed": resumed,
        "resume_failed": resume_failed,
        "wrong_tokens": t["wrong_tokens"],
        "duplicated_tokens": t["duplicated_tokens"],
        **fired,
        **t,
        "kv_blocks_recomputed_by_decode": recomputed,
        "settled": settle_s is not None,
        "phase_s": round(time.monotonic() - t0, 1),
    }


async def run_fuzz(system: System, jobs: list[Job], sc: Scenario) -> dict:
    """The hostile-input fault, when its module is present: fuzzing alongside the load."""
    try:
        mod = importlib.import_module(FUZZ_MODULE)
    except ModuleNotFoundError as e:
        return {"fault": "fuzz", "ran": False, "why": f"{FUZZ_MODULE} is not available ({e})"}
    client = Client(system.url, system.grpc)
    try:
        load = Load(client, jobs, sc.rate)
        load.start()
        fuzzed = await asyncio.to_thread(mod.run, system.url, system.grpc, sc.fuzz_s)
        t_end = time.monotonic()
        recovery_s, probes, probes_failed = await _recover(client, t_end, sc.recover_wait_s)
        outcomes = await load.wait()
    finally:
        await client.close()
    t = _tally(outcomes)
    return {
        "fault": "fuzz",
        "ran": True,
        "action": f"{fuzzed['requests']} hostile requests for {sc.fuzz_s:g} s",
        "fuzz_requests": fuzzed["requests"],
        "fuzz_5xx": fuzzed["status_5xx"],
        "fuzz_timeouts": fuzzed.get("timeouts"),
        "fuzz_statuses": fuzzed.get("statuses"),
        "fuzz_failures": fuzzed.get("failures"),
        "sent": t["load_requests"] + probes,
        "failed": t["load_failed"] + probes_failed,
        "wrong_tokens": t["wrong_tokens"],
        "duplicated_tokens": t["duplicated_tokens"],
        "recovery_s": None if recovery_s is None else round(recovery_s, 3),
        **t,
    }


def summarize(results: list[dict]) -> dict:
    ran = [r for r in results if r.get("ran")]
    faults = [r for r in ran if r["fault"] not in ("none", "fuzz")]
    fuzz = [r for r in ran if r["fault"] == "fuzz"]
    recoveries = [r["recovery_s"] for r in faults]
    return {
        "wrong_tokens": sum(r["wrong_tokens"] for r in ran),
        "duplicated_tokens": sum(r["duplicated_tokens"] for r in ran),
        "failed_requests": sum(r["failed"] for r in ran),
        "resumed_requests": sum(r.get("resumed", 0) for r in ran),
        "missing_tokens": sum(r.get("missing_tokens", 0) for r in ran),
        "text_mismatches": sum(r.get("text_mismatches", 0) for r in ran),
        "fuzz_5xx": fuzz[0]["fuzz_5xx"] if fuzz else None,
        # None when a fault's system never answered a fresh request again in the wait.
        "recovery_s_max": None if None in recoveries else max(recoveries, default=None),
        "requests_sent": sum(r["sent"] for r in ran),
        "faults_run": [r["fault"] for r in ran],
        "faults_not_run": [r["fault"] for r in results if not r.get("ran")],
    }


def plan_all(faults: list[str], sc: Scenario, model_dir: Path) -> dict[str, list[Job]]:
    """Each fault's stretch of the load with its references (one local engine)."""
    jobs = plan_jobs(sc.requests * len(faults), sc.max_tokens, sc.seed)
    jobs = with_references(jobs, model_dir)
    return {name: jobs[k * sc.requests : (k + 1) * sc.requests] for k, name in enumerate(faults)}


def tiny_model_dir() -> Path:
    """The tiny preset's directory, made (as `up` would) if it is not there yet."""
    from splitserve.up import demo_config, resolve_model_path

    return resolve_model_path(demo_config("tiny", 0, 0, "disaggregated").models[0])


async def run_all(system: System, plans: dict[str, list[Job]], sc: Scenario) -> list:
    results = []
    for name, jobs in plans.items():
        if name == "fuzz":
            row = await run_fuzz(system, jobs, sc)
        else:
            row = await run_fault(system, FAULT_TABLE[name], jobs, sc)
        print(_line(row), flush=True)
        results.append(row)
    return results


def _line(r: dict) -> str:
    if not r.get("ran"):
        return f"{r['fault']:>15}: not run ({r['why']})"
    rec = "-" if r.get("recovery_s") is None else f"{r['recovery_s']:.1f} s"
    return (
        f"{r['fault']:>15}: {r['sent']} sent, {r['failed']} failed, {r.get('resumed', 0):g} "
        f"resumed, {r['wrong_tokens']} wrong, {r['duplicated_tokens']} duplicated, "
        f"recovered in {rec}" + (f"; errors {r['errors']}" if r["errors"] else "")
    )


def start_args(metrics_port: int, grpc_port: int) -> list[str]:
    return ["--model", "tiny", "--port", str(free_port()), "--grpc-port", str(grpc_port),
            "--metrics-port", str(metrics_port)]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--quick", action="store_true",
        help=f"fewer requests, and by default only the faults {', '.join(QUICK_FAULTS)}",
    )  # fmt: skip
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument(
        "--faults", default=None,
        help=f"comma-separated, in order (default: all, {', '.join(FAULTS)})",
    )  # fmt: skip
    ap.add_argument("--requests", type=int, default=None, help="of the load, per fault")
    ap.add_argument(
        "--rate", type=float, default=None,
        help="requests/s of the load (soak: by default 70%% of the measured throughput)",
    )  # fmt: skip
    ap.add_argument(
        "--soak", action="store_true",
        help="no faults: a long steady run that reports RSS, open files and /dev/shm use of "
        "up's processes over time",
    )  # fmt: skip
    ap.add_argument("--soak-s", type=float, default=1800.0, help="the soak's length")
    ap.add_argument("--sample-s", type=float, default=10.0, help="the soak's sampling period")
    ap.add_argument(
        "--calibrate-s", type=float, default=15.0,
        help="the soak's closed-loop throughput measurement (its rate: 70%%)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    sc = QUICK if args.quick else Scenario()
    if args.requests is not None:
        sc = dataclasses.replace(sc, requests=args.requests)
    if args.soak:
        from bench.chaos_soak import soak

        soak(args, sc, argv)
        return
    if args.rate is not None:
        sc = dataclasses.replace(sc, rate=args.rate)
    chosen = args.faults or ",".join(QUICK_FAULTS if args.quick else FAULTS)
    faults = [f.strip() for f in chosen.split(",") if f.strip()]
    unknown = set(faults) - set(FAULTS)
    if unknown:
        ap.error(f"unknown faults {sorted(unknown)}; known: {', '.join(FAULTS)}")
    t0 = time.monotonic()
    model_dir = tiny_model_dir()
    grpc_port, metrics_port = free_port(), free_port()
    # The references are computed while the system starts (one torch thread).
    with ThreadPoolExecutor(1) as pool:
        planned = pool.submit(plan_all, faults, sc, model_dir)
        with up_session(*start_args(metrics_port, grpc_port)) as up:
            system = System(up, f"127.0.0.1:{grpc_port}", metrics_port)
            plans = planned.result()
            print(f"up and references ready in {time.monotonic() - t0:.1f} s", flush=True)
            results = asyncio.run(run_all(system, plans, sc))
            dead = tree_usage(up.proc.pid)["shm_dead_holder_dirs"]
    summary = summarize(results) | {
        "shm_dead_holder_dirs": dead,
        "wall_s": round(time.monotonic() - t0, 1),
    }
    print(summary)
    write_report(args.json, "chaos", argv, results, summary, scenario=dataclasses.asdict(sc))


if __name__ == "__main__":
    main()
