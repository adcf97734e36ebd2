"""The KV lending ledger (kvstore/lending.py) on a real Redis-compatible server, and the
`splitserve kv ledger` view of it."""

from __future__ import annotations

import json
import threading

import pytest
import redis
from typer.testing import CliRunner

from kvstore.lending import CreditorInfo, Ledger
from splitserve.cli import app
from tests.kv_helpers import wait_for


@pytest.fixture
def ledger(redis_url, namespace):
    lg = Ledger(redis_url, namespace, ttl_s=30.0)
    yield lg
    lg.close()


def info(cid: str, capacity: int = 100, lend_cap: int = 50, lent: int = 0, layout: str = "L"):
    return CreditorInfo(cid, f"{cid}:1", "host", layout, capacity, lend_cap, lent)


def test_spare_is_capped_by_capacity_and_floors_at_zero():
    assert info("a", capacity=10, lend_cap=50).spare == 10
    assert info("a", capacity=100, lend_cap=50, lent=20).spare == 30
    assert info("a", capacity=100, lend_cap=5, lent=20).spare == 0


def test_announce_lists_most_spare_first_and_filters_by_layout(ledger):
    ledger.announce(info("b", lend_cap=10))
    ledger.announce(info("a", lend_cap=10))  # ties with b: by id
    ledger.announce(info("c", lend_cap=40, lent=5))
    ledger.announce(info("d", lend_cap=99, layout="other"))
    got = ledger.creditors()
    assert [c.creditor_id for c in got] == ["d", "c", "a", "b"]
    assert got[1] == info("c", lend_cap=40, lent=5)  # every field round-trips
    assert [c.creditor_id for c in ledger.creditors("L")] == ["c", "a", "b"]
    assert ledger.creditors("nobody") == []
    # The creditor is authoritative: announcing again overwrites lent.
    ledger.announce(info("c", lend_cap=40, lent=0))
    assert next(c for c in ledger.creditors() if c.creditor_id == "c").lent == 0


def test_try_lend_enforces_the_cap_and_changes_nothing_when_refused(ledger):
    ledger.announce(info("a", lend_cap=10))
    assert ledger.try_lend("a", "d1", 6)
    assert ledger.try_lend("a", "d2", 4)
    assert not ledger.try_lend("a", "d1", 1)
    assert ledger.creditors()[0].lent == 10
    assert ledger.debts() == {"a": {"d1": 6, "d2": 4}}
    assert not ledger.try_lend("nobody", "d1", 1)  # no entry: no lending
    assert ledger.debts() == {"a": {"d1": 6, "d2": 4}}


def test_set_lend_cap(ledger):
    ledger.announce(info("a", lend_cap=10))
    assert ledger.try_lend("a", "d1", 8)
    ledger.set_lend_cap("a", 5)  # below lent: nothing more until repaid
    assert ledger.creditors()[0].spare == 0
    assert not ledger.try_lend("a", "d1", 1)
    ledger.repay("a", "d1", 4)
    assert ledger.try_lend("a", "d1", 1)
    assert not ledger.try_lend("a", "d1", 1)
    ledger.set_lend_cap("gone", 7)  # a missing entry is not created (it would have no TTL)
    assert not ledger.r.exists(ledger._creditor("gone"))


def test_concurrent_lending_never_passes_the_cap(ledger):
    cap = 200
    ledger.announce(info("a", capacity=1000, lend_cap=cap))
    granted = [0] * 8
    start = threading.Barrier(8)

    def borrower(i: int) -> None:
        start.wait()
        for _ in range(cap):  # bounded: more attempts than the cap allows
            n = 1 + (i % 3)
            if ledger.try_lend("a", f"d{i}", n):
                granted[i] += n

    threads = [threading.Thread(target=borrower, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    lent = ledger.creditors()[0].lent
    owed = ledger.debts()["a"]
    assert sum(granted) == lent == sum(owed.values()) <= cap
    assert cap - lent < 3  # it was filled up to within the largest ask
    assert {b: n for b, n in owed.items()} == {f"d{i}": g for i, g in enumerate(granted) if g}


def test_repay_floors_at_zero_and_removes_settled_borrowers(ledger):
    ledger.announce(info("a"))
    assert ledger.try_lend("a", "d1", 5)
    assert ledger.try_lend("a", "d2", 3)
    assert ledger.repay("a", "d1", 2) == 2
    assert ledger.debts() == {"a": {"d1": 3, "d2": 3}}
    assert ledger.repay("a", "d1", 10) == 3  # only what it owed
    assert ledger.debts() == {"a": {"d2": 3}}
    assert not ledger.r.hexists(ledger._debt("a"), "d1")  # HDEL, not a 0
    assert ledger.repay("a", "d1", 1) == 0
    assert ledger.repay("a", "stranger", 1) == 0
    assert ledger.creditors()[0].lent == 3
    assert ledger.repay_all("a", "d2") == 3
    assert ledger.repay_all("a", "d2") == 0
    assert ledger.creditors()[0].lent == 0
    assert ledger.debts() == {"a": {}}


def test_repay_all(ledger):
    ledger.announce(info("a"))
    for _ in range(4):
        assert ledger.try_lend("a", "d1", 2)
    assert ledger.try_lend("a", "d2", 1)
    assert ledger.repay_all("a", "d1") == 8
    assert ledger.debts() == {"a": {"d2": 1}}
    assert ledger.creditors()[0].lent == 1


@pytest.mark.parametrize("n", [0, -1, 1.5, "2", True, None])
def test_block_counts_must_be_positive_ints(ledger, n):
    ledger.announce(info("a"))
    with pytest.raises(ValueError):
        ledger.try_lend("a", "d1", n)
    with pytest.raises(ValueError):
        ledger.repay("a", "d1", n)
    assert ledger.creditors()[0].lent == 0


def test_ids_must_be_non_empty(ledger):
    with pytest.raises(ValueError):
        ledger.announce(info(""))
    with pytest.raises(ValueError):
        ledger.try_lend("", "d1", 1)
    with pytest.raises(ValueError):
        ledger.try_lend("a", "", 1)
    with pytest.raises(ValueError):
        ledger.repay("a", "", 1)
    with pytest.raises(ValueError):
        ledger.repay_all("", "d1")
    with pytest.raises(ValueError):
        ledger.set_lend_cap("a", -1)
    with pytest.raises(ValueError):
        ledger.announce(info("a", lent=-1))


def test_withdraw(ledger):
    ledger.announce(info("a"))
    ledger.announce(info("b"))
    assert ledger.try_lend("a", "d1", 2)
    ledger.withdraw("a")
    assert [c.creditor_id for c in ledger.creditors()] == ["b"]
    assert ledger.debts() == {"b": {}}
    assert not ledger.r.exists(ledger._debt("a"))
    assert not ledger.r.sismember(ledger._set, "a")


def test_a_dead_creditor_expires_from_creditors_and_debts(redis_url, namespace):
    short = Ledger(redis_url, namespace, ttl_s=0.5)
    long = Ledger(redis_url, namespace, ttl_s=30.0)
    try:
        short.announce(info("dies"))
        long.announce(info("lives"))
        assert short.try_lend("dies", "d1", 3)
        assert long.try_lend("lives", "d1", 2)
        assert set(long.debts()) == {"dies", "lives"}
        wait_for(lambda: [c.creditor_id for c in long.creditors()] == ["lives"], timeout=10)
        assert long.debts() == {"lives": {"d1": 2}}
        assert not long.r.sismember(long._set, "dies")  # pruned by the reader
        assert not short.heartbeat("dies")
    finally:
        short.close()
        long.close()


def test_heartbeat_renews_ttl(redis_url, namespace):
    lg = Ledger(redis_url, namespace, ttl_s=1.0)
    try:
        lg.announce(info("a"))
        assert lg.try_lend("a", "d1", 1)
        lg.r.pexpire(lg._creditor("a"), 50)  # about to die...
        lg.r.pexpire(lg._debt("a"), 50)
        assert lg.heartbeat("a")  # ...renewed
        assert lg.r.pttl(lg._creditor("a")) > 500
        assert lg.r.pttl(lg._debt("a")) > 500
    finally:
        lg.close()


def test_heartbeat_puts_back_a_pruned_set_member(ledger):
    ledger.announce(info("a"))
    ledger.r.srem(ledger._set, "a")  # as a reader's prune racing a restore could
    assert ledger.creditors() == []
    assert ledger.heartbeat("a")
    assert [c.creditor_id for c in ledger.creditors()] == ["a"]


def test_restore_after_flushall_brings_back_lent_and_debts(fresh_redis):
    lg = Ledger(fresh_redis.url, "ns", ttl_s=30.0)
    try:
        lg.announce(info("a", lend_cap=20))
        assert lg.try_lend("a", "d1", 5)
        assert lg.try_lend("a", "d2", 2)
        assert lg.heartbeat("a")
        lg.r.flushall()
        assert not lg.heartbeat("a")
        assert lg.creditors() == [] and lg.debts() == {}
        assert not lg.try_lend("a", "d1", 1)  # no entry, no lending until restored
        # The creditor restores from its own state (lent, and to whom).
        lg.restore(info("a", lend_cap=20, lent=7), {"d1": 5, "d2": 2, "d3": 0})
        assert lg.heartbeat("a")
        assert lg.creditors() == [info("a", lend_cap=20, lent=7)]
        assert lg.debts() == {"a": {"d1": 5, "d2": 2}}
        assert lg.r.pttl(lg._debt("a")) > 0
        # and goes on from there
        assert lg.try_lend("a", "d1", 13)
        assert not lg.try_lend("a", "d1", 1)
        # restore replaces the debts wholesale
        lg.restore(info("a", lend_cap=20, lent=1), {"d2": 1})
        assert lg.debts() == {"a": {"d2": 1}}
    finally:
        lg.close()


def test_restore_rejects_bad_debts(ledger):
    with pytest.raises(ValueError):
        ledger.restore(info("a"), {"d1": -1})
    with pytest.raises(ValueError):
        ledger.restore(info("a"), {"": 1})
    assert ledger.creditors() == []  # nothing written


# -- the CLI --------------------------------------------------------------------------------


def test_cli_kv_ledger_prints_who_owes_whom(ledger, redis_url, namespace):
    ledger.announce(info("cred-a", capacity=64, lend_cap=32))
    ledger.announce(info("cred-b", capacity=16, lend_cap=16))
    assert ledger.try_lend("cred-a", "dec-1", 5)
    assert ledger.try_lend("cred-a", "dec-2", 7)
    assert ledger.try_lend("cred-b", "dec-1", 3)
    runner = CliRunner()
    res = runner.invoke(app, ["kv", "ledger", "--redis", redis_url, "--namespace", namespace])
    assert res.exit_code == 0, res.output
    lines = [" ".join(line.replace("│", " ").split()) for line in res.output.splitlines()]
    assert "cred-a cred-a:1 64 32 12 20 L" in lines
    assert "cred-b cred-b:1 16 16 3 13 L" in lines
    assert "cred-a dec-1 5" in lines
    assert "cred-a dec-2 7" in lines
    assert "cred-b dec-1 3" in lines

    res = runner.invoke(
        app, ["kv", "ledger", "--redis", redis_url, "--namespace", namespace, "--json"]
    )
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["debts"] == {"cred-a": {"dec-1": 5, "dec-2": 7}, "cred-b": {"dec-1": 3}}
    assert [c["creditor_id"] for c in doc["creditors"]] == ["cred-a", "cred-b"]
    assert doc["creditors"][0] == {
        "creditor_id": "cred-a", "address": "cred-a:1", "host_id": "host", "layout": "L",
        "capacity": 64, "lend_cap": 32, "lent": 12, "spare": 20,
    }  # fmt: skip


def test_cli_kv_ledger_empty(redis_url, namespace):
    res = CliRunner().invoke(app, ["kv", "ledger", "--redis", redis_url, "--namespace", namespace])
    assert res.exit_code == 0, res.output
    assert "no live creditors" in res.output


def test_cli_kv_ledger_unreachable_redis_exits_2():
    res = CliRunner().invoke(app, ["kv", "ledger", "--redis", "redis://127.0.0.1:1"])
    assert res.exit_code == 2
    assert res.exception is None or isinstance(res.exception, SystemExit)
    assert "error:" in res.output and "cannot read the lending ledger" in res.output
    assert "Traceback" not in res.output


def test_cli_kv_ledger_bad_url_exits_2():
    res = CliRunner().invoke(app, ["kv", "ledger", "--redis", "nonsense://x"])
    assert res.exit_code == 2
    assert "error:" in res.output


def test_ledger_unreachable_raises_redis_error():
    lg = Ledger("redis://127.0.0.1:1", ttl_s=1.0)
    try:
        with pytest.raises(redis.RedisError):
            lg.creditors()
    finally:
        lg.close()
