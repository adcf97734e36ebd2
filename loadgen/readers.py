"""Trace readers: BurstGPT CSV, Azure LLM inference CSV, Mooncake JSONL.

Every reader checks each row and raises `TraceError` naming the file and the 1-based line of the
first bad one, with what was expected. Arrivals become seconds from the first request.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from loadgen.trace import Trace, TraceError, TraceRequest

SHIPPED_DIR = Path(__file__).resolve().parent / "traces"
# Excerpts in the repo (see traces/README.md), by the short names the CLI accepts.
SHIPPED = {
    "azure-conv": "azure_conv_2023_head1000.csv",
    "azure-code": "azure_code_2023_head1000.csv",
    "mooncake-conversation": "mooncake_conversation_head300.jsonl",
    "mooncake-synthetic": "mooncake_synthetic_head200.jsonl",
}
FORMATS = ("burstgpt", "azure", "mooncake")
MOONCAKE_BLOCK_TOKENS = 512

BURSTGPT_COLUMNS = (
    "Timestamp",
    "Model",
    "Request tokens",
    "Response tokens",
    "Total tokens",
    "Log Type",
)
AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


def resolve(name_or_path: str | Path) -> Path:
    """A shipped excerpt's short name, or a path."""
    if str(name_or_path) in SHIPPED:
        return SHIPPED_DIR / SHIPPED[str(name_or_path)]
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise TraceError(path, None, f"no such file (shipped traces: {', '.join(sorted(SHIPPED))})")
    return path


def sniff(path: Path) -> str:
    """The format from the file's first line."""
    with open(path, encoding="utf-8", newline="") as f:
        first = f.readline().strip()
    if first.startswith("{"):
        return "mooncake"
    cols = [c.strip() for c in first.split(",")]
    if cols[:3] == list(AZURE_COLUMNS):
        return "azure"
    if "Timestamp" in cols and "Request tokens" in cols:
        return "burstgpt"
    raise TraceError(
        path,
        1,
        f"unknown trace format: header {first[:80]!r}; expected a BurstGPT header "
        f"({','.join(BURSTGPT_COLUMNS)}), an Azure header ({','.join(AZURE_COLUMNS)}) or "
        "Mooncake JSON lines",
    )


def read_trace(name_or_path: str | Path, fmt: str | None = None, **kw) -> Trace:
    path = resolve(name_or_path)
    fmt = fmt or sniff(path)
    readers = {"burstgpt": read_burstgpt, "azure": read_azure, "mooncake": read_mooncake}
    if fmt not in readers:
        raise TraceError(path, None, f"unknown format {fmt!r}; choose {', '.join(FORMATS)}")
    return readers[fmt](path, **kw)


def _int(path: Path, line: int, field: str, text: str, minimum: int = 0) -> int:
    try:
        v = int(text)
    except (TypeError, ValueError):
        raise TraceError(path, line, f"{field} must be an integer, got {text!r}") from None
    if v < minimum:
        raise TraceError(path, line, f"{field} must be >= {minimum}, got {v}")
    return v


def _csv_rows(path: Path, columns: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row) for each data row, after checking the header has `columns`."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise TraceError(path, 1, "empty file: expected a header row")
        header = [h.strip() for h in header]
        missing = [c for c in columns if c not in header]
        if missing:
            raise TraceError(path, 1, f"header lacks {', '.join(missing)}; got {','.join(header)}")
        for row in reader:
            line = reader.line_num
            if not row:
                continue
            if len(row) != len(header):
                raise TraceError(
                    path,
                    line,
                    f"expected {len(header)} fields ({','.join(header)}), "
                    f"got {len(row)}: {','.join(row)[:80]!r}",
                )
            yield line, dict(zip(header, row, strict=True))


def read_burstgpt(path: Path, include_failures: bool = False) -> Trace:
    """BurstGPT 1/2 (6 columns) or 3 (8 columns). `Timestamp` is seconds from the file's first
    day; rows with `Response tokens` = 0 are failed requests upstream and are skipped unless
    `include_failures` (they would ask for zero output tokens)."""
    rows: list[tuple[float, int, TraceRequest]] = []
    failures = 0
    for line, r in _csv_rows(path, BURSTGPT_COLUMNS):
        try:
            ts = float(r["Timestamp"])
        except ValueError:
            raise TraceError(
                path, line, f"Timestamp must be a number of seconds, got {r['Timestamp']!r}"
            ) from None
        if not math.isfinite(ts):
            raise TraceError(path, line, f"Timestamp must be finite, got {r['Timestamp']!r}")
        prompt = _int(path, line, "Request tokens", r["Request tokens"])
        out = _int(path, line, "Response tokens", r["Response tokens"])
        total = _int(path, line, "Total tokens", r["Total tokens"])
        if total != prompt + out:
            raise TraceError(
                path,
                line,
                f"Total tokens {total} != Request tokens {prompt} + Response tokens {out}",
            )
        if out == 0:
            failures += 1
            if not include_failures:
                continue
        labels = [("model", r["Model"]), ("log_type", r["Log Type"])]
        if "Session ID" in r:
            labels.append(("session", r["Session ID"]))
        rows.append((ts, line, TraceRequest(ts, max(prompt, 1), out, labels=tuple(labels))))
    # Several requests may share one second; the file order breaks ties.
    rows.sort(key=lambda x: (x[0], x[1]))
    return _rebased(
        path,
        "burstgpt",
        [r for _, _, r in rows],
        0,
        (
            f"{failures} failed rows (Response tokens = 0) "
            f"{'kept' if include_failures else 'skipped'}",
        ),
    )


def _azure_time(path: Path, line: int, text: str) -> float:
    # Seven fractional digits (100 ns) are one more than datetime parses: the last is added.
    try:
        base = datetime.fromisoformat(text[:26])
        extra = int(text[26:]) * 1e-7 if len(text) > 26 else 0.0
    except ValueError:
        raise TraceError(
            path, line, f"TIMESTAMP must look like 2023-11-16 18:15:46.6805900, got {text!r}"
        ) from None
    return base.timestamp() + extra


def read_azure(path: Path) -> Trace:
    reqs = []
    prev = -math.inf
    for line, r in _csv_rows(path, AZURE_COLUMNS):
        ts = _azure_time(path, line, r["TIMESTAMP"].strip())
        if ts < prev:
            raise TraceError(path, line, "TIMESTAMP goes back in time; rows must be sorted")
        prev = ts
        prompt = _int(path, line, "ContextTokens", r["ContextTokens"], 1)
        out = _int(path, line, "GeneratedTokens", r["GeneratedTokens"], 1)
        reqs.append(TraceRequest(ts, prompt, out))
    return _rebased(path, "azure", reqs, 0, ())


def read_mooncake(path: Path) -> Trace:
    reqs = []
    prev = -math.inf
    with open(path, encoding="utf-8") as f:
        for line, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                msg = f"not valid JSON: {e.msg} (column {e.colno})"
                raise TraceError(path, line, msg) from None
            if not isinstance(obj, dict):
                raise TraceError(path, line, "expected a JSON object per line")
            for key in ("timestamp", "input_length", "output_length", "hash_ids"):
                if key not in obj:
                    raise TraceError(path, line, f"missing field {key!r}")
            ts = _int(path, line, "timestamp", obj["timestamp"])
            if ts < prev:
                raise TraceError(path, line, "timestamp goes back in time; lines must be sorted")
            prev = ts
            prompt = _int(path, line, "input_length", obj["input_length"], 1)
            out = _int(path, line, "output_length", obj["output_length"], 1)
            ids = obj["hash_ids"]
            if not isinstance(ids, list) or not all(type(i) is int and i >= 0 for i in ids):
                raise TraceError(path, line, "hash_ids must be a list of integers >= 0")
            want = math.ceil(prompt / MOONCAKE_BLOCK_TOKENS)
            if len(ids) != want:
                raise TraceError(
                    path,
                    line,
                    f"{len(ids)} hash_ids for input_length {prompt}; expected "
                    f"ceil({prompt}/{MOONCAKE_BLOCK_TOKENS}) = {want}",
                )
            reqs.append(TraceRequest(ts / 1000.0, prompt, out, tuple(ids)))
    return _rebased(path, "mooncake", reqs, MOONCAKE_BLOCK_TOKENS, ())


def _rebased(path: Path, fmt: str, reqs: list[TraceRequest], block: int, notes) -> Trace:
    if not reqs:
        raise TraceError(path, None, "no requests in the trace")
    t0 = reqs[0].arrival_s
    out = [
        TraceRequest(r.arrival_s - t0, r.prompt_tokens, r.output_tokens, r.hash_ids, r.labels)
        for r in reqs
    ]
    name = next((k for k, v in SHIPPED.items() if path == SHIPPED_DIR / v), path.name)
    return Trace(name, out, block, f"{fmt}:{path}", tuple(notes))
