"""An engine's steps over a stretch of a benchmark: how many, their mean time and tokens.
Read from a replica's /metrics (`splitserve:engine_step*_total`) or from an EngineLoop in the
benchmark's own process, so a busy replica's steps can be set against the bare engine's:
slower steps, or emptier ones?"""

from __future__ import annotations


def loop_counters(loop) -> dict[str, float]:
    """step_counters of an EngineLoop in this process (the bare engine)."""
    return {"steps": loop.steps, "step_seconds": loop.step_seconds,
            "step_tokens": loop.engine.scheduler.tokens_scheduled}  # fmt: skip


def step_counters(metrics_address: str) -> dict[str, float]:
    """A replica's engine step counters from its /metrics (empty where it can't be read)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    if not metrics_address:
        return {}
    try:
        text = httpx.get(f"http://{metrics_address}/metrics", timeout=30).text
    except httpx.HTTPError:
        return {}
    names = {f"splitserve:engine_{k}_total": k for k in ("steps", "step_seconds", "step_tokens")}
    return {names[s.name]: s.value for fam in text_string_to_metric_families(text)
            for s in fam.samples if s.name in names}  # fmt: skip


def step_split(before: dict[str, float], after: dict[str, float]) -> dict:
    """Steps between two step_counters and their mean time and tokens: are a busy replica's
    steps slower than the bare engine's, or emptier?"""
    steps = after.get("steps", 0.0) - before.get("steps", 0.0)
    if steps <= 0:
        return {}
    per = {k: (after.get(k, 0.0) - before.get(k, 0.0)) / steps
           for k in ("step_seconds", "step_tokens")}  # fmt: skip
    return {"steps": steps, "step_ms_mean": 1e3 * per["step_seconds"],
            "step_tokens_mean": per["step_tokens"]}  # fmt: skip
