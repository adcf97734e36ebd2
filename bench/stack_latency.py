"""What the router and Ray add to a request, and whether the official client is served: used by
bench/gpu_stack.py against a running `splitserve up` (colocated)."""

from __future__ import annotations

import asyncio
import time

perf = time.perf_counter


async def one_at_a_time(make_clients, planned: dict) -> dict:
    """Each path's requests, one in flight at a time, the paths taking turns (so drift in the
    machine's state falls on all alike): {path: [Outcome]}. Clients are made on this loop
    (a gRPC channel belongs to the loop it was made on)."""
    from loadgen.outcome import Outcome

    clients = make_clients()
    for c in clients.values():
        await c.open(1)
    got: dict = {k: [] for k in clients}
    for i in range(len(next(iter(planned.values())))):
        for k, c in clients.items():
            fut = asyncio.get_running_loop().create_future()
            p = planned[k][i]
            c.submit(p, Outcome.of(p, perf()), fut.set_result)
            got[k].append(await fut)
    for c in clients.values():
        await c.close()
    return got


def overhead(url: str, grpc_port: int, replica: str, model: str, vocab: int, s: dict) -> dict:
    """Latency the router and Ray add at low load: p50 TTFT and TPOT through the router's HTTP
    and gRPC against the same requests sent straight to the replica's gRPC port. The prompts
    are token ids, so the HTTP client asks for `return_token_ids` and times tokens by id, as
    the other two paths do (random weights' tokens often have no text)."""
    import numpy as np

    from bench.goodput_2gpu import IdPrompts, PDReplayClient
    from loadgen.grpc_client import GrpcClient
    from loadgen.http_client import HttpClient
    from loadgen.workload import Planned

    def clients() -> dict:
        return {"direct": PDReplayClient("colocated", [replica], s["seq_tokens"]),
                "http": HttpClient(f"{url}/v1", model, timeout_s=s["timeout_s"],
                                   extra_body={"temperature": 0}),
                "grpc": GrpcClient(f"grpc://127.0.0.1:{grpc_port}", model,
                                   timeout_s=s["timeout_s"], temperature=0.0)}  # fmt: skip

    ids = IdPrompts(vocab, seed=7)
    planned = {k: [Planned(j * 1000 + i, 0.0, ids.build(j * 1000 + i, s["seq_prompt"]),
                           s["seq_tokens"], "default", "", False)
                   for i in range(s["seq_requests"])]
               for j, k in enumerate(("direct", "http", "grpc"))}  # fmt: skip
    got = asyncio.run(one_at_a_time(clients, planned))
    res: dict = {"requests_per_path": s["seq_requests"], "prompt_tokens": s["seq_prompt"],
                 "output_tokens": s["seq_tokens"]}  # fmt: skip
    for k, outs in got.items():
        ok = [o for o in outs[1:] if o.ok]  # the first of each path warms its connection
        res[k] = {
            "ok": len(ok),
            "errors": sorted({o.error for o in outs if o.error}),
            "ttft_ms_p50": float(np.median([o.ttft for o in ok])) * 1e3 if ok else None,
            "tpot_ms_p50": float(np.median([o.tpot for o in ok])) * 1e3 if ok else None,
        }
    for k in ("http", "grpc"):
        d, v = res["direct"], res[k]
        if d["ttft_ms_p50"] is not None and v["ttft_ms_p50"] is not None:
            v["added_ms_per_request"] = v["ttft_ms_p50"] - d["ttft_ms_p50"]
            v["added_ms_per_token"] = v["tpot_ms_p50"] - d["tpot_ms_p50"]
    return res


def openai_check(url: str, model: str, timeout_s: float) -> dict:
    """One streamed completion (token-id prompt) and one chat completion through the official
    openai client; what came back, or the error."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=timeout_s, max_retries=0)
    out: dict = {}
    try:
        stream = client.completions.create(
            model=model, prompt=list(range(100, 164)), max_tokens=16, temperature=0, stream=True
        )
        pieces = [c.choices[0].text for c in stream if c.choices]
        out["completion"] = {"pieces": len(pieces), "chars": len("".join(pieces))}
    except Exception as e:
        out["completion"] = {"error": f"{type(e).__name__}: {e}"}
    try:
        chat = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=16
        )
        used = chat.usage.completion_tokens if chat.usage else None
        out["chat"] = {"finish_reason": chat.choices[0].finish_reason, "completion_tokens": used}
    except Exception as e:
        out["chat"] = {"error": f"{type(e).__name__}: {e}"}
    return out
