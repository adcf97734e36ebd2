"""The KV hand-off between two GPUs of one host, for one request's KV and for 1 GiB: a raw
peer copy in one process, the same bytes through a CUDA IPC handle another process exported
(what kvstore.cuda_ipc does), and through host bytes (device -> host bytes -> device).

Used by bench/goodput_2gpu.py (its `kv_handoff` summary); needs two visible GPUs.
"""

from __future__ import annotations

import time

import numpy as np

perf = time.perf_counter


def _ipc_producer(q, done, nbytes):
    import torch

    t = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda:0")
    torch.cuda.synchronize()
    q.put(t)  # torch.multiprocessing sends a CUDA IPC handle, not the bytes
    done.wait()


def kv_handoff(per_token_bytes: int, tokens: int) -> dict:
    """GB/s moving one request's KV (and 1 GiB) GPU0 -> GPU1: raw peer copy, through a CUDA
    IPC handle exported by another process, and via host bytes."""
    import torch
    import torch.multiprocessing as mp

    out: dict = {"request_tokens": tokens, "per_token_bytes": per_token_bytes}
    if torch.cuda.device_count() < 2:
        out["skipped"] = "needs two visible GPUs"
        return out
    out["peer_access"] = bool(torch.cuda.can_device_access_peer(0, 1))

    def timed(fn, reps=10):
        for _ in range(2):
            fn()
        torch.cuda.synchronize(0)
        torch.cuda.synchronize(1)
        ts = []
        for _ in range(reps):
            t0 = perf()
            fn()
            torch.cuda.synchronize(0)
            torch.cuda.synchronize(1)
            ts.append(perf() - t0)
        return float(np.median(ts))

    ctx = mp.get_context("spawn")
    for label, n in (("request", per_token_bytes * tokens), ("1GiB", 1 << 30)):
        src = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda:0")
        dst = torch.empty(n, dtype=torch.uint8, device="cuda:1")
        t_raw = timed(lambda src=src, dst=dst: dst.copy_(src, non_blocking=True))

        def host(src=src):
            b = src.cpu().numpy().tobytes()  # what KVBlock.to_bytes + the wire do
            back = torch.frombuffer(bytearray(b), dtype=torch.uint8)
            return back.to("cuda:1")

        t_host = timed(host, reps=3)
        q, done = ctx.Queue(), ctx.Event()
        p = ctx.Process(target=_ipc_producer, args=(q, done, n))
        p.start()
        try:
            t_open0 = perf()
            shared = q.get(timeout=120)  # opened here on GPU 0 through the IPC handle
            t_open = perf() - t_open0
            t_ipc = timed(lambda s=shared, dst=dst: dst.copy_(s, non_blocking=True))
            ok = bool(torch.equal(dst[:4096].cpu(), shared[:4096].cpu()))
            del shared
        finally:
            done.set()
            p.join(30)
        out[label] = {
            "bytes": n,
            "raw_peer_copy_GBps": n / t_raw / 1e9,
            "cuda_ipc_copy_GBps": n / t_ipc / 1e9,
            "cuda_ipc_open_plus_first_get_s": t_open,
            "cuda_ipc_bytes_match": ok,
            "host_path_GBps": n / t_host / 1e9,
            "host_path_ms": t_host * 1e3,
            "raw_peer_copy_ms": t_raw * 1e3,
        }
        del src, dst
        torch.cuda.empty_cache()
    return out
