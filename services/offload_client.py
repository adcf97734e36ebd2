"""The model worker's side of attention offload: AttentionShards over attention workers' streams.

The model worker's KV heads are split into contiguous ranges, one per attention worker; each
worker holds its range of every block of the model worker's pool. One stream per worker; the
engine thread sends each batch's layout and layer batches and waits for outputs. On one host
the tensors travel through shared buffers, one pair per batch tag (two: ping-pong). A worker
whose stream breaks is lost: the waiting outputs fail with WorkerLostError, the engine
preempts every sequence (their K/V lost a head range), and recover() attaches a live worker
for the lost range before steps go on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import grpc
import numpy as np
import torch

from protos.splitserve.v1 import offload_pb2 as pb
from protos.splitserve.v1 import offload_pb2_grpc as pb_grpc
from rpc.tensor import TensorSpec
from services import local_link
from services.engine.config import ModelConfig
from services.engine.offload_plan import StepLayout, WorkerLostError, head_ranges
from services.ipc_link import IpcBuffer, decoder_layout
from services.offload_server import layout_to_pb
from services.session_stream import SessionStream
from services.wire import tensor_from_pb, tensor_spec, tensor_to_pb, to_host

log = logging.getLogger(__name__)

OK = grpc.StatusCode.OK.value[0]
Part = pb.OffloadLayer.Part
TAGS = 2  # batch tags with their own shared buffers: ping-pong's two


class OffloadRefused(RuntimeError):
    """No attention worker would hold a head range (full, wrong layout, unreachable)."""


@dataclass
class _Worker:
    index: int
    heads: tuple[int, int]
    address: str = ""
    stream: SessionStream | None = None
    link: local_link.LinkClient | None = None

    @property
    def live(self) -> bool:
        return (
            self.stream is not None
            and self.stream.broken is None
            and (self.link is None or self.link.broken is None)
        )


class _Out:
    def __init__(
        self, fut: Future | int, w: _Worker, timeout_s: float, buf: IpcBuffer | None, n: int,
        device: str,
    ) -> None:  # fmt: skip
        self.fut, self.w, self.timeout_s, self.buf, self.n = fut, w, timeout_s, buf, n
        self.device = device

    def result(self) -> torch.Tensor:
        try:
            if isinstance(self.fut, int):  # a request on the local link: its id
                assert self.w.link is not None
                resp = self.w.link.wait(self.fut)
            else:
                resp = self.fut.result(timeout=self.timeout_s)
        except FutureTimeout:
            raise WorkerLostError(self.w.index, f"no answer in {self.timeout_s:.0f} s") from None
        if resp.code != OK:
            raise WorkerLostError(self.w.index, f"{resp.message} (code {resp.code})")
        if resp.ipc and self.buf is not None:
            self.buf.wait(host=True)
            return self.buf.regions[0][: self.n]
        if not resp.HasField("out"):  # a request answered with no tensor (a load)
            return torch.empty(0)
        return tensor_from_pb(resp.out, "out").to(self.device, non_blocking=True)


class AttentionWorkers:
    """AttentionShards for one model worker. find(): addresses of the model's live attention
    workers (the registry's), asked at connect and when one is lost."""

    def __init__(
        self,
        worker_id: str,
        cfg: ModelConfig,
        layout: str,
        num_blocks: int,
        dtype: torch.dtype,
        device: str,
        find: Callable[[], list[str]],
        num_workers: int,
        rows: int,
        timeout_s: float = 60.0,
        shared: bool = True,
        local: bool = True,
        adopt: bool = True,
        on_placement: Callable[[list[tuple[str, tuple[int, int]]]], None] | None = None,
    ) -> None:
        """rows: the most rows a batch may have (the engine's step budget); shared: offer
        shared buffers to workers on this host (else bytes only); local: with shared buffers,
        layouts and layer batches over a local socket (else over the gRPC stream); adopt: at
        the first connect, take over the regions a model worker that went away left (its
        sequences then find their blocks in the prefix cache)."""
        self.worker_id = worker_id
        self.cfg = cfg
        self.layout = layout
        self.num_blocks = num_blocks
        self.dtype = dtype
        self.device = device
        self.find = find
        self.rows = rows
        self.timeout_s = timeout_s
        self.shared = shared
        self.local = local  # with shared buffers, per-layer traffic over a local socket
        self.on_placement = on_placement
        self.heads = head_ranges(cfg.num_kv_heads, num_workers)
        self.group = cfg.num_heads // cfg.num_kv_heads
        self._workers = [_Worker(i, h) for i, h in enumerate(self.heads)]
        self._generation = 0
        # The first connect adopts what a model worker that went away left on the workers (see
        # Attach.adopt): whose it was, and per worker the cached blocks it reported.
        self._adopting = adopt
        self._origin = ""
        self._found: dict[int, dict[int, bytes]] = {}
        self.adopted: list[tuple[int, bytes]] = []  # blocks every worker holds, by content

    # -- connecting ---------------------------------------------------------------------------

    def connect(self, wait_s: float = 0.0) -> None:
        """Attach a worker for every head range not held by a live one, waiting up to wait_s
        for enough workers to appear; raises OffloadRefused if some range stays without."""
        deadline = time.monotonic() + wait_s
        while True:
            missing = self._attach_missing()
            if not missing:
                break
            if time.monotonic() >= deadline:
                raise OffloadRefused(
                    f"no attention worker holds KV heads {[self.heads[i] for i in missing]} "
                    f"({len(self._candidates())} reachable, {len(self.heads)} needed)"
                )
            time.sleep(0.2)
        if self._adopting:
            self._adopting = False
            maps = [self._found.get(w.index, {}) for w in self._workers]
            common = set.intersection(*(set(m.items()) for m in maps)) if maps else set()
            self.adopted = sorted(common)  # every head range of these blocks is in place
        if self.on_placement is not None:
            self.on_placement(self.placement())

    def placement(self) -> list[tuple[str, tuple[int, int]]]:
        return [(w.address, w.heads) for w in self._workers]

    def recover(self, wait_s: float = 1.0) -> bool:
        """Attach live workers for lost head ranges; False if some range is still without one."""
        try:
            self.connect(wait_s)
            return True
        except OffloadRefused as e:
            log.warning("%s", e)
            return False

    @property
    def ready(self) -> bool:
        return all(w.live for w in self._workers)

    def _candidates(self) -> list[str]:
        try:
            found = self.find()
        except Exception as e:  # the registry away: try again later
            log.warning("cannot list attention workers: %s", e)
            return []
        used = {w.address for w in self._workers if w.live}
        return [a for a in found if a not in used]

    def _attach_missing(self) -> list[int]:
        missing = []
        for w in self._workers:
            if w.live:
                continue
            self._drop(w)
            for address in self._candidates():
                if self._attach(w, address):
                    break
            if not w.live:
                missing.append(w.index)
        return missing

    def _attach(self, w: _Worker, address: str) -> bool:
        stream = SessionStream(
            f"offload-{w.index}", address, lambda ch: pb_grpc.AttentionOffloadStub(ch).Session,
            pb.OffloadRequest, lambda why, i=w.index: WorkerLostError(i, why),
        )  # fmt: skip
        a, b = w.heads
        attach = pb.Attach(
            worker_id=self.worker_id, layout=self.layout, kv_head_start=a, kv_head_end=b,
            num_blocks=self.num_blocks,
        )  # fmt: skip
        mine = self._offer(w, attach)
        attach.local = bool(mine) and self.local
        if self._adopting and (w.index == 0 or self._origin):
            attach.adopt, attach.adopt_from = True, self._origin
        elif not self._adopting:
            # Recovering: the region this model worker had there (if that worker is the same
            # and kept it) is memory to reuse; its cached blocks were forgotten already.
            attach.adopt, attach.adopt_from = True, self.worker_id
        try:
            resp = stream.send(attach=attach).result(timeout=self.timeout_s)
        except (WorkerLostError, FutureTimeout) as e:
            log.info("attention worker %s unreachable: %s", address, e)
            resp = None
        if resp is None or resp.code != OK:
            if resp is not None:
                log.warning("attention worker %s refused heads %s: %s", address, w.heads,
                            resp.message)  # fmt: skip
            stream.close()
            for buf in mine:
                buf.close()
            return False
        if mine and len(resp.ipc_links) == len(mine):
            theirs = self._map(w, resp.ipc_links)
            if theirs is not None:
                stream.ipc = list(zip(mine, theirs, strict=True))
                for buf in mine:
                    buf.unlink()  # the worker mapped them before answering
        if stream.ipc is None:
            for buf in mine:
                buf.close()
        w.link = None
        if stream.ipc is not None and resp.local_socket:
            try:
                sock = local_link.connect(resp.local_socket, self.timeout_s)
                w.link = local_link.LinkClient(
                    sock,
                    pb.OffloadRequest,
                    pb.OffloadResponse.FromString,
                    lambda why, i=w.index: WorkerLostError(i, why),
                )
            except OSError as e:
                log.info("no local link to %s (%s): layer batches over gRPC", address, e)
        w.stream, w.address = stream, address
        self._generation += 1
        if resp.adopted_from:
            self._origin = resp.adopted_from
            ids = np.frombuffer(resp.cached_blocks, dtype=np.int64).tolist()
            self._found[w.index] = dict(zip(ids, resp.cached_hashes, strict=True))
            log.info("%s adopted the KV heads %s of %s on %s (%d cached blocks)",
                     self.worker_id, w.heads, resp.adopted_from, address, len(ids))  # fmt: skip
        log.info("KV heads %s of %s on attention worker %s", w.heads, self.worker_id, address)
        return True

    def _offer(self, w: _Worker, attach: pb.Attach) -> list[IpcBuffer]:
        if not self.shared:
            return []
        hs = w.heads[1] - w.heads[0]
        layout = decoder_layout(hs * self.group, hs, self.cfg.head_dim, self.dtype)
        mine = []
        try:
            for _ in range(TAGS):
                if torch.device(self.device).type == "cuda":
                    mine.append(IpcBuffer.create(torch.device(self.device), self.rows, layout))
                else:
                    mine.append(IpcBuffer.create_shm(self.rows, layout))
        except (OSError, RuntimeError) as e:
            log.info("no shared buffers for layer batches (%s): bytes then", e)
            for buf in mine:
                buf.close()
            return []
        for buf in mine:
            attach.ipc.append(buf.link)
        return mine

    def _map(self, w: _Worker, links) -> list[IpcBuffer] | None:
        hs = w.heads[1] - w.heads[0]
        layout = [(self.dtype, (hs * self.group, self.cfg.head_dim))]
        try:
            return [
                IpcBuffer.open_shm(link, layout) if link.shm_path else IpcBuffer.open(link, layout)
                for link in links
            ]
        except (OSError, RuntimeError, LookupError, ValueError) as e:
            log.info("cannot map the worker's buffers (%s): bytes then", e)
            return None

    def close(self) -> None:
        for w in self._workers:
            self._drop(w)

    @staticmethod
    def _drop(w: _Worker) -> None:
        if w.link is not None:
            w.link.close()
            w.link = None
        if w.stream is not None:
            w.stream.close()
            w.stream = None

    # -- AttentionShards ----------------------------------------------------------------------

    def begin_step(self, tag: int, layout: StepLayout) -> None:
        msg = layout_to_pb(tag, layout)
        for w in self._workers:
            self._live(w).send(want_answer=False, step=msg)

    @property
    def generation(self) -> int:
        """Changes whenever a worker is (re)attached: its buffers are new."""
        return self._generation

    def buffers(self, worker: int, tag: int):
        """(q, k, v, o) shared regions of a worker and batch tag, or None (bytes only)."""
        w = self._workers[worker]
        ipc = w.stream.ipc if w.stream is not None else None
        if ipc is None or tag >= len(ipc):
            return None
        mine, theirs = ipc[tag]
        return (*mine.regions, theirs.regions[0])

    def send_ready(self, worker: int, tag: int, layer: int, n: int) -> _Out:
        """A layer batch of n rows already in the worker's shared buffer (written on this
        stream): announce it."""
        w = self._workers[worker]
        stream = self._live(w)
        assert w.stream is not None and w.stream.ipc is not None
        mine, theirs = w.stream.ipc[tag]
        msg = pb.OffloadLayer(tag=tag, layer=layer, part=Part.ALL, ipc=True)
        for region, f in zip(mine.regions, (msg.q, msg.k, msg.v), strict=True):
            f.layout.CopyFrom(_spec(region[:n]).to_pb())
        mine.ready()
        return _Out(stream.send(layer=msg), w, self.timeout_s, theirs, n, self.device)

    def load_blocks(self, loads: list[tuple[int, torch.Tensor]]) -> None:
        """Handed-off KV, (block id, [L, 2, T, Hkv, D]): each worker gets its heads of every
        block (blocks of one length in one message), before the step that reads them."""
        by_len: dict[int, list[tuple[int, torch.Tensor]]] = {}
        for bid, kv in loads:
            by_len.setdefault(kv.shape[2], []).append((bid, kv))
        waits = []
        for group in by_len.values():
            ids = np.array([b for b, _ in group], dtype=np.int64).tobytes()
            kv = torch.stack([t for _, t in group])  # [n, L, 2, T, Hkv, D]
            for w in self._workers:
                a, b = w.heads
                msg = pb.LoadBlocks(block_ids=ids)
                tensor_to_pb(to_host(kv[..., a:b, :])[0], msg.kv)
                waits.append(_Out(self._live(w).send(load=msg), w, self.timeout_s, None, 0,
                                  self.device))  # fmt: skip
        for out in waits:
            out.result()  # in place, or WorkerLostError

    def send(self, worker, tag, layer, q, k, v) -> _Out:
        return self._send(worker, tag, layer, Part.ALL, q, k, v)

    def send_q(self, worker, tag, layer, q) -> _Out:
        return self._send(worker, tag, layer, Part.Q, q, None, None)

    def send_kv(self, worker, tag, layer, k, v) -> None:
        self._send(worker, tag, layer, Part.KV, None, k, v)

    def _send(self, worker: int, tag: int, layer: int, part, q, k, v) -> _Out:
        w = self._workers[worker]
        stream = self._live(w)
        msg = pb.OffloadLayer(tag=tag, layer=layer, part=part)
        named = [(t, f, i) for i, (t, f) in enumerate(((q, msg.q), (k, msg.k), (v, msg.v)))]
        named = [(t, f, i) for t, f, i in named if t is not None]
        n = len(named[0][0])
        ipc = w.stream.ipc if w.stream is not None else None
        pair = ipc[tag] if ipc is not None and tag < len(ipc) else None
        if pair is not None and n <= pair[0].rows:
            mine, theirs = pair
            for t, f, i in named:
                mine.regions[i][:n].copy_(t)
                f.layout.CopyFrom(_spec(t).to_pb())
            mine.ready()
            msg.ipc = True
        else:
            theirs = None
            hosted = to_host(*(t for t, _, _ in named))
            for t, (_, f, _) in zip(hosted, named, strict=True):
                tensor_to_pb(t, f)
        fut = stream.send(want_answer=part != Part.KV, layer=msg)
        return _Out(fut, w, self.timeout_s, theirs, n, self.device)

    def _live(self, w: _Worker) -> SessionStream | local_link.LinkClient:
        """Where this worker's requests go: its local link if it has one, else its stream."""
        if w.stream is None or w.stream.broken is not None:
            raise WorkerLostError(w.index, w.stream.broken if w.stream else "not attached")
        return w.link if w.link is not None else w.stream


def _spec(t: torch.Tensor) -> TensorSpec:
    return tensor_spec(t.dtype, t.shape)


def _placement_key(ns: str, worker_id: str) -> str:
    return f"{ns}:offload:{worker_id}"


def record_placement(
    redis_url: str, ns: str, worker_id: str, placement: list[tuple[str, tuple[int, int]]]
) -> None:
    """Where a model worker's KV heads are: `{ns}:offload:{worker}` maps "a-b" (KV heads
    [a, b)) to the attention worker's address (`splitserve kv ledger` shows it)."""
    import redis

    r = redis.Redis.from_url(redis_url, socket_timeout=5.0)
    try:
        key = _placement_key(ns, worker_id)
        p = r.pipeline()
        p.delete(key)
        p.hset(key, mapping={f"{a}-{b}": address for address, (a, b) in placement})
        p.execute()
    finally:
        r.close()


def forget_placement(redis_url: str, ns: str, worker_id: str) -> None:
    import redis

    r = redis.Redis.from_url(redis_url, socket_timeout=5.0)
    try:
        r.delete(_placement_key(ns, worker_id))
    finally:
        r.close()


def placements(redis_url: str, ns: str) -> dict[str, dict[str, str]]:
    """Every model worker's placement: {worker: {"a-b": address}}."""
    import redis

    r = redis.Redis.from_url(redis_url, socket_timeout=5.0, decode_responses=True)
    try:
        keys = sorted(r.scan_iter(match=f"{ns}:offload:*", count=500))
        return {k.split(":", 2)[2]: r.hgetall(k) for k in keys}
    finally:
        r.close()
