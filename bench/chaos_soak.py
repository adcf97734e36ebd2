"""The chaos benchmark's soak: `splitserve up` under a steady load for a long time, with the
memory, open files and shared memory of all its processes sampled over time (goal: flat after
warm-up). Every request is still checked token by token.

The rate is 70% of the throughput measured just before, closed-loop at a fixed concurrency,
with the same requests (or --rate). Sampled from /proc for every process of up's session (its
Ray workers and the private Redis server included): RSS and PSS (PSS shares pages between the
processes that map them, so its sum is the tree's real footprint), open file descriptors, and
/dev/shm: the pages of shared-memory files the processes map (counted once per file, Ray's
object store included) plus the KV holders' arenas there that no process maps; also whether
any dead holder left its arena behind."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import re
import time
from pathlib import Path

from bench.chaos_load import Client, Job, Outcome, plan_jobs, with_references
from bench.report import write_report
from bench.up_process import free_port, session_pids, up_session

SHM = Path("/dev/shm")
HOLDER_DIR = re.compile(r"^splitserve-.+-(\d+)$")  # kvstore.shm_layout: <prefix><holder>-<pid>
_MAP = re.compile(r"^[0-9a-f]+-[0-9a-f]+ \S+ \S+ \S+ (\d+)\s+(/dev/shm/\S+)")


def _kb(text: str, field: str) -> int:
    m = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) * 1024 if m else 0


def _shm_maps(pid: int) -> dict[int, tuple[str, int]]:
    """{inode: (path, resident bytes)} of the /dev/shm files a process maps."""
    out: dict[int, tuple[str, int]] = {}
    cur = None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            m = _MAP.match(line)
            if m:
                cur = int(m.group(1))
                path, rss = out.get(cur, (m.group(2), 0))
                out[cur] = (path, rss)
            elif line[0].isdigit() or line[0] in "abcdef":
                cur = None  # a mapping of something else
            elif cur is not None and line.startswith("Rss:"):
                path, rss = out[cur]
                out[cur] = (path, rss + int(line.split()[1]) * 1024)
    return out


def _allocated(d: Path) -> int:
    total = 0
    for root, _, files in os.walk(d):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(root, name)).st_blocks * 512
    return total


def tree_usage(sid: int) -> dict:
    """One sample of a session's processes (see the module's docstring)."""
    pids = session_pids(sid)
    rss = pss = fds = 0
    mapped: dict[int, tuple[str, int]] = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            rss += _kb(Path(f"/proc/{pid}/status").read_text(), "VmRSS")
            pss += _kb(Path(f"/proc/{pid}/smaps_rollup").read_text(), "Pss")
            fds += len(os.listdir(f"/proc/{pid}/fd"))
            for inode, (path, r) in _shm_maps(pid).items():
                mapped[inode] = (path, max(r, mapped.get(inode, (path, 0))[1]))
    shm = sum(r for _, r in mapped.values())
    mapped_paths = {p for p, _ in mapped.values()}
    dead_holders = 0
    live = set(pids)
    for d in SHM.iterdir() if SHM.is_dir() else ():
        m = HOLDER_DIR.match(d.name)
        if not m or not d.is_dir():
            continue
        if int(m.group(1)) in live:
            # The arena's pages a holder maps are counted above; the rest of its files here.
            for root, _, files in os.walk(d):
                for name in files:
                    p = os.path.join(root, name)
                    if p not in mapped_paths:
                        with contextlib.suppress(OSError):
                            shm += os.stat(p).st_blocks * 512
        elif not Path(f"/proc/{m.group(1)}").exists():
            dead_holders += 1  # of any owner: this host's, whoever started it
    return {"processes": len(pids), "rss_bytes": rss, "pss_bytes": pss, "fds": fds,
            "shm_bytes": shm, "shm_dead_holder_dirs": dead_holders}  # fmt: skip


async def _closed_loop(client: Client, jobs: list[Job], concurrency: int, seconds: float):
    """Requests/s done by `concurrency` clients sending back to back for `seconds`."""
    t0 = time.monotonic()
    done = 0

    async def worker(k: int) -> None:
        nonlocal done
        while time.monotonic() - t0 < seconds:
            o = await client.run(jobs[k % len(jobs)])
            done += o.ok
            k += concurrency

    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return done / (time.monotonic() - t0)


@dataclasses.dataclass
class Tally:
    sent: int = 0
    failed: int = 0
    wrong: int = 0
    duplicated: int = 0
    missing: int = 0  # of finished requests
    text_mismatches: int = 0
    errors: set = dataclasses.field(default_factory=set)

    def add(self, o: Outcome) -> None:
        c = o.check()
        self.sent += 1
        self.failed += not o.ok
        self.wrong += c.wrong
        self.duplicated += c.duplicated
        self.missing += c.missing if o.ok else 0
        self.text_mismatches += o.ok and not o.text_ok()
        if o.error and len(self.errors) < 5:
            self.errors.add(o.error)


async def _soak(url: str, grpc_addr: str, sid: int, jobs: list[Job], args, sc) -> dict:
    client = Client(url, grpc_addr)
    try:
        capacity = None
        rate = args.rate
        if rate is None:
            capacity = await _closed_loop(client, jobs, 8, args.calibrate_s)
            rate = 0.7 * capacity
        tally, tasks, samples = Tally(), set(), []
        t0 = time.monotonic()
        next_sample, k = t0, 0
        while (now := time.monotonic()) - t0 < args.soak_s:
            if now >= next_sample:
                s = await asyncio.to_thread(tree_usage, sid)
                samples.append({"t_s": round(now - t0, 1), **s, "in_flight": len(tasks)})
                next_sample += args.sample_s
            task = asyncio.create_task(client.run(jobs[k % len(jobs)]))
            task.add_done_callback(lambda t: (tasks.discard(t), tally.add(t.result())))
            tasks.add(task)
            k += 1
            await asyncio.sleep(max(0.0, t0 + k / rate - time.monotonic()))
        await asyncio.gather(*list(tasks))
        samples.append({"t_s": round(time.monotonic() - t0, 1),
                        **await asyncio.to_thread(tree_usage, sid), "in_flight": 0})  # fmt: skip
    finally:
        await client.close()
    return {"capacity_rps": capacity, "rate_rps": rate, "tally": tally, "samples": samples}


def _growth(samples: list[dict], key: str, warmup: int) -> dict:
    after = samples[warmup:] or samples
    first, last = after[0][key], after[-1][key]
    span_min = max((after[-1]["t_s"] - after[0]["t_s"]) / 60, 1e-9)
    return {"after_warmup": first, "end": last, "max": max(s[key] for s in after),
            "per_min": round((last - first) / span_min, 1)}  # fmt: skip


SOAK_MAX_TOKENS = 256


def soak(args: argparse.Namespace, sc, argv: list[str] | None) -> None:
    from bench.chaos import start_args, tiny_model_dir

    t0 = time.monotonic()
    jobs = with_references(plan_jobs(64, SOAK_MAX_TOKENS, sc.seed), tiny_model_dir())
    grpc_port, metrics_port = free_port(), free_port()
    with up_session(*start_args(metrics_port, grpc_port)) as up:
        res = asyncio.run(_soak(up.url, f"127.0.0.1:{grpc_port}", up.proc.pid, jobs, args, sc))
    samples, t = res["samples"], res["tally"]
    warmup = max(1, len(samples) // 5)  # the first fifth of the samples is warm-up
    summary = {
        "wrong_tokens": t.wrong,
        "duplicated_tokens": t.duplicated,
        "failed_requests": t.failed,
        "resumed_requests": 0,  # no fault: nothing to resume
        "missing_tokens": t.missing,
        "text_mismatches": t.text_mismatches,
        "fuzz_5xx": None,
        "recovery_s_max": None,
        "requests_sent": t.sent,
        "soak_s": args.soak_s,
        "capacity_rps": res["capacity_rps"] and round(res["capacity_rps"], 2),
        "rate_rps": round(res["rate_rps"], 2),
        **{k: _growth(samples, k, warmup) for k in ("pss_bytes", "rss_bytes", "fds",
                                                     "shm_bytes", "processes")},
        "shm_dead_holder_dirs_end": samples[-1]["shm_dead_holder_dirs"],
        "errors": sorted(t.errors),
        "wall_s": round(time.monotonic() - t0, 1),
    }  # fmt: skip
    for s in samples:
        print(f"{s['t_s']:>7.1f} s: {s['processes']} processes, PSS {s['pss_bytes'] / 2**20:.0f}"
              f" MiB, RSS {s['rss_bytes'] / 2**20:.0f} MiB, {s['fds']} fds, /dev/shm "
              f"{s['shm_bytes'] / 2**20:.1f} MiB, {s['in_flight']} in flight")  # fmt: skip
    print(summary)
    write_report(args.json, "chaos", argv, samples, summary, mode="soak",
                 scenario=dataclasses.asdict(sc))  # fmt: skip
