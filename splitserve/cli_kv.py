"""`splitserve kv ...`: the cluster's KV state in Redis, as an operator reads it."""

from __future__ import annotations

import dataclasses
import json
from typing import Annotated

import typer
from rich.console import Console

from splitserve.cli_common import fail

kv_app = typer.Typer(help="Look at the cluster's KV state in Redis.", no_args_is_help=True)


@kv_app.command("ledger")
def kv_ledger(
    redis_url: Annotated[str, typer.Option("--redis", help="Redis URL of the lending ledger")],
    namespace: Annotated[str, typer.Option("--namespace", help="Redis key prefix")] = "splitserve",
    as_json: Annotated[
        bool, typer.Option("--json", help='Print {"creditors": [...], "debts": {...}}')
    ] = False,
) -> None:
    """Who owes whom in the KV lending ledger (blocks each borrower holds of each creditor).

    Lists each live creditor's pool, lend cap, lent and spare blocks, then one row per debt."""
    import redis
    from rich.table import Table

    from kvstore.lending import Ledger

    try:
        ledger = Ledger(redis_url, namespace)
    except ValueError as e:  # a URL redis-py can't parse
        fail(f"--redis: {e}")
    try:
        creditors = ledger.creditors()
        debts = ledger.debts()
    except (redis.RedisError, OSError) as e:
        fail(f"cannot read the lending ledger at {redis_url}: {e}")
    finally:
        ledger.close()
    # Two reads: a creditor that came or went between them shows in neither's rows alone.
    live = {c.creditor_id for c in creditors}
    debts = {cid: d for cid, d in debts.items() if cid in live}
    if as_json:
        rows = [{**dataclasses.asdict(c), "spare": c.spare} for c in creditors]
        print(json.dumps({"creditors": rows, "debts": debts}))
        return
    out = Console(soft_wrap=True)
    if not creditors:
        out.print(f"no live creditors in namespace {namespace!r}", highlight=False)
        return
    ct = Table(title=f"KV creditors ({namespace})", title_justify="left")
    # Ids and numbers whole; the address and layout (long, often alike) fold if short of room.
    ct.add_column("creditor", no_wrap=True)
    ct.add_column("address", overflow="fold", min_width=10)
    for col in ("capacity", "lend_cap", "lent", "spare"):
        ct.add_column(col, justify="right", no_wrap=True)
    ct.add_column("layout", overflow="fold", min_width=16)
    for c in creditors:
        nums = (c.capacity, c.lend_cap, c.lent, c.spare)
        ct.add_row(c.creditor_id, c.address, *(str(v) for v in nums), c.layout)
    out.print(ct)
    dt = Table(title="Who owes whom (blocks)", title_justify="left")
    dt.add_column("creditor", no_wrap=True)
    dt.add_column("borrower", no_wrap=True)
    dt.add_column("blocks", justify="right", no_wrap=True)
    for c in creditors:
        for borrower, n in debts.get(c.creditor_id, {}).items():
            dt.add_row(c.creditor_id, borrower, str(n))
    if dt.row_count:
        out.print(dt)
    else:
        out.print("nothing lent", highlight=False)


@kv_app.command("offload")
def kv_offload(
    redis_url: Annotated[str, typer.Option("--redis", help="Redis URL of the cluster")],
    namespace: Annotated[str, typer.Option("--namespace", help="Redis key prefix")] = "splitserve",
    as_json: Annotated[
        bool, typer.Option("--json", help='Print {worker: {"a-b": address}}')
    ] = False,
) -> None:
    """Attention offload: which attention worker holds which KV heads of each model worker."""
    import redis
    from rich.table import Table

    from services.offload_client import placements

    try:
        placed = placements(redis_url, namespace)
    except ValueError as e:
        fail(f"--redis: {e}")
    except (redis.RedisError, OSError) as e:
        fail(f"cannot read the offload placements at {redis_url}: {e}")
    if as_json:
        print(json.dumps(placed))
        return
    out = Console(soft_wrap=True)
    if not placed:
        out.print(f"no offload model workers in namespace {namespace!r}", highlight=False)
        return
    t = Table(title=f"KV heads of model workers ({namespace})", title_justify="left")
    for col in ("model worker", "KV heads", "attention worker"):
        t.add_column(col, no_wrap=col != "attention worker", overflow="fold")
    for worker, heads in placed.items():
        for rng, address in sorted(heads.items(), key=lambda kv: int(kv[0].split("-")[0])):
            t.add_row(worker, rng, address)
    out.print(t)
