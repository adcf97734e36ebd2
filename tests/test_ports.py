"""Ports picked before their server binds come from outside the kernel's ephemeral range, so no
bind to port 0 or outgoing connection can take one in between."""

from __future__ import annotations

import socket

from rpc import ports


def test_picked_ports_lie_below_the_ephemeral_range_and_differ():
    lo, _ = ports.ephemeral_range()
    picked = [ports.free_port() for _ in range(50)]
    assert len(set(picked)) == 50
    assert all(ports._LOWEST <= p < lo for p in picked)
    for p in picked[:5]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))


def _two_free_neighbours() -> int:
    for _ in range(100):
        p = ports.free_port()
        if ports._bindable("127.0.0.1", p + 1):
            return p
    raise AssertionError("no two free neighbouring ports below the ephemeral range")


def test_a_port_in_use_is_not_picked(monkeypatch):
    p = _two_free_neighbours()
    monkeypatch.setattr(ports, "_given", set())
    monkeypatch.setattr(ports, "_LOWEST", p)
    monkeypatch.setattr(ports, "ephemeral_range", lambda: (p + 2, 60999))
    with socket.socket() as held:
        held.bind(("127.0.0.1", p))
        assert ports.free_port() == p + 1
        with socket.socket() as held2:
            held2.bind(("127.0.0.1", p + 1))
            # Nothing free below the range: the kernel's pick, which is free.
            fallback = ports.free_port()
            assert fallback not in (p, p + 1)


def test_every_port_ephemeral_falls_back_to_the_kernels_pick(monkeypatch):
    monkeypatch.setattr(ports, "ephemeral_range", lambda: (1024, 65535))
    port = ports.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_ipv6_loopback():
    if not socket.has_ipv6:
        return
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return  # no ::1 on this machine
    port = ports.free_port("::1")
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", port))
