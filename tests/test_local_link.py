"""The same-host control link: framing, one client's answers in order, and failures that must
reach the peer at once rather than as a hang."""

from __future__ import annotations

import time

import pytest

from protos.splitserve.v1 import attention_pb2 as pb
from services import local_link


class Lost(Exception):
    pass


def _client(path: str, seen=None) -> local_link.LinkClient:
    sock = local_link.connect(path, timeout_s=30)
    return local_link.LinkClient(sock, pb.AttentionRequest, pb.AttentionResponse.FromString,
                                 Lost, seen)  # fmt: skip


def test_requests_are_answered_in_order_and_unawaited_answers_are_seen():
    def handle(req):
        return [pb.AttentionResponse(id=req.id, message=req.WhichOneof("body") or "",
                                     reclaim=["s1"] if req.HasField("step") else [])]  # fmt: skip

    server = local_link.LinkServer("t", pb.AttentionRequest.FromString, handle)
    seen = []
    c = _client(server.path, seen.append)
    c.send(want_answer=False, step=pb.StepBegin())
    rid = c.send(layer=pb.LayerBatch(layer=3))
    assert c.wait(rid).message == "layer"
    assert [r.message for r in seen] == ["step", "layer"]  # the step's answer was read, dropped
    assert list(seen[0].reclaim) == ["s1"]
    server.close()
    with pytest.raises(Lost):
        c.wait(c.send(layer=pb.LayerBatch(layer=4)))
    c.close()


def test_a_server_that_fails_before_its_peer_comes_in_refuses_it():
    def setup():
        raise RuntimeError("no such device")

    server = local_link.LinkServer("t", pb.AttentionRequest.FromString, lambda r: [], setup)
    t0 = time.monotonic()
    try:
        c = _client(server.path)
        with pytest.raises(Lost):  # EOF, not a wait for the socket's timeout
            c.wait(c.send(layer=pb.LayerBatch(layer=0)))
        c.close()
    except OSError:
        pass  # or the socket file is already gone: refused at connect
    assert time.monotonic() - t0 < 25
    server.close()


def test_close_ends_a_server_whose_peer_never_came():
    server = local_link.LinkServer("t", pb.AttentionRequest.FromString, lambda r: [])
    t0 = time.monotonic()
    server.close()
    assert not server._thread.is_alive()
    assert time.monotonic() - t0 < 25
