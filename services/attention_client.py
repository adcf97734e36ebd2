"""The decoder's side of lending: a RemoteKV over attention replicas' gRPC streams.

The engine thread calls it synchronously: borrow (find a creditor in the Redis ledger, ask it),
release, and per step and layer, send a layer batch and later wait for its partial. One
bidirectional stream per creditor; a reader thread per stream hands each response to the
future waiting on it. A creditor whose stream breaks (it died) is lost: the layer batches in
flight fail with HolderLostError and the engine recomputes those sequences elsewhere.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import grpc
import torch

from kvstore.cuda_ipc import open_pool
from kvstore.lending import Ledger
from protos.splitserve.v1 import attention_pb2 as pb
from protos.splitserve.v1 import attention_pb2_grpc as pb_grpc
from services import local_link
from services.engine.kv_cache import KVCache
from services.engine.kv_transfer import KVLayout
from services.engine.remote_kv import HolderLostError, RemoteSegment, SeqSlice
from services.ipc_link import IpcBuffer, decoder_layout, replica_layout
from services.session_stream import SessionStream
from services.wire import tensor_from_pb, tensor_spec, tensor_to_pb, to_host

log = logging.getLogger(__name__)

OK = grpc.StatusCode.OK.value[0]


def layout_key(model_id: str, layout: KVLayout) -> str:
    """What a borrower's and a creditor's KV must share for blocks to be lent: the model and
    the block layout (not the device)."""
    return (
        f"{model_id}/{layout.dtype}/L{layout.num_layers}/H{layout.num_kv_heads}"
        f"/D{layout.head_dim}/B{layout.block_size}"
    )


def _stream_to(holder_id: str, address: str, on_reclaim) -> SessionStream:
    """One creditor's stream: requests in order, responses matched by id."""

    def seen(resp) -> None:
        if resp.reclaim:
            on_reclaim(holder_id, list(resp.reclaim))

    return SessionStream(
        holder_id, address, lambda ch: pb_grpc.AttentionStub(ch).Session, pb.AttentionRequest,
        lambda why: HolderLostError(holder_id, why), seen,
    )  # fmt: skip


class _Partial:
    def __init__(
        self, fut: Future | int, holder_id: str, timeout_s: float, ipc: IpcBuffer | None = None,
        num_q: int = 0, link: local_link.LinkClient | None = None, host_wait: bool = False,
    ) -> None:  # fmt: skip
        self.fut = fut  # a future of the gRPC stream, or a request id on the local link
        self.holder_id = holder_id
        self.timeout_s = timeout_s
        self.ipc = ipc  # the replica's buffer, where an IPC answer is
        self.num_q = num_q
        self.link = link
        self.host_wait = host_wait

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            if isinstance(self.fut, int):
                assert self.link is not None
                resp = self.link.wait(self.fut)
            else:
                resp = self.fut.result(timeout=self.timeout_s)
        except FutureTimeout:
            raise HolderLostError(self.holder_id, f"no answer in {self.timeout_s:.0f} s") from None
        if resp.code != OK:
            # NOT_FOUND: it no longer holds the sequence (restarted): as good as lost.
            raise HolderLostError(self.holder_id, resp.message)
        if resp.layer.ipc and self.ipc is not None:
            # In the replica's buffer, once its event fires (AttentionPeers.host_wait says
            # whether this thread or the GPU waits for it).
            self.ipc.wait(host=self.host_wait)
            n = self.num_q
            return self.ipc.regions[0][:n], self.ipc.regions[1][:n]
        return tensor_from_pb(resp.layer.out, "out"), tensor_from_pb(resp.layer.lse, "lse")


@dataclass(frozen=True)
class IpcSpec:
    """What a decoder needs to offer lenders on its host shared buffers for layer batches (CUDA
    IPC on a GPU, shared memory on a CPU): its device, the rows one layer batch may have (a
    step's tokens) and the shape of q and k/v rows."""

    device: str
    rows: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    num_layers: int = 0  # with block_size: the shape of a lender's pool read in place
    block_size: int = 0


class AttentionPeers:
    """RemoteKV for an engine: borrows from attention replicas listed in the lending ledger."""

    def __init__(
        self,
        ledger: Ledger,
        borrower_id: str,
        layout: str,
        timeout_s: float = 60.0,
        ipc: IpcSpec | None = None,
    ) -> None:
        """timeout_s: how long a creditor may take to answer one request before it counts as
        lost (it scales with nothing: one layer batch or one borrow). ipc: offer replicas on
        this host a CUDA IPC link for layer batches (those that can't map it keep to bytes)."""
        self.ipc = ipc
        # Wait for the other side's shared-buffer event on the thread (True) or on the GPU
        # stream (False, the default: on an H200 with the holder in another process, split
        # decode steps were faster so, with and without MPS; docs/benchmarks.md). Both sides
        # of a session do as the decoder says at Hello.
        self.host_wait = False
        # Read and write the blocks a lender on this GPU lent in place (its pool mapped here),
        # rather than send it layer batches.
        self.in_place_ok = True
        self._pools: dict[str, KVCache] = {}  # holder -> its pool, mapped here
        self.ledger = ledger
        self.borrower_id = borrower_id
        self.layout = layout
        self.timeout_s = timeout_s
        self._streams: dict[str, SessionStream] = {}
        self._links: dict[str, local_link.LinkClient] = {}  # holder -> its local link
        self._held: dict[str, dict[str, int]] = {}  # seq id -> {holder -> blocks}
        self._reclaimed: list[str] = []
        self._lock = threading.Lock()
        self._ledger_down = False
        self._caps: dict[str, int] = {}  # creditor -> its cap, as last seen in the ledger

    @classmethod
    def for_engine(
        cls, engine, ledger: Ledger, borrower_id: str, shared: bool = True, **kw
    ) -> AttentionPeers:
        """Peers for this engine's KV layout; shared: offer lenders on this host shared
        buffers for layer batches as large as the engine's step (else bytes only)."""
        mc = engine.model_config
        ipc = IpcSpec(
            engine.device, engine.config.max_num_batched_tokens, mc.num_heads, mc.num_kv_heads,
            mc.head_dim, engine.dtype, mc.num_layers, engine.config.block_size,
        ) if shared else None  # fmt: skip
        layout = layout_key(engine.model_id, engine.kv_block_layout())
        return cls(ledger, borrower_id, layout, ipc=ipc, **kw)

    # -- RemoteKV -----------------------------------------------------------------------------

    def borrow(self, seq_id: str, first_block: int, num_blocks: int) -> RemoteSegment | None:
        creditors = self._creditors()
        if creditors is None:  # no lending now; the scheduler preempts or waits instead
            return None
        for c in creditors:
            if c.spare < num_blocks or c.creditor_id == self.borrower_id:  # not from itself
                continue
            stream = self._stream(c.creditor_id, c.address)
            if stream is None:
                continue
            fut = stream.send(
                borrow=pb.Borrow(seq_id=seq_id, first_block=first_block, num_blocks=num_blocks)
            )
            try:
                resp = fut.result(timeout=self.timeout_s)
            except (HolderLostError, FutureTimeout) as e:
                log.info("creditor %s did not lend: %s", c.creditor_id, e)
                continue
            if resp.code != OK:
                log.debug("creditor %s refused: %s", c.creditor_id, resp.message)
                continue
            held = self._held.setdefault(seq_id, {})
            held[c.creditor_id] = held.get(c.creditor_id, 0) + num_blocks
            self._caps[c.creditor_id] = min(c.lend_cap, c.capacity)
            return RemoteSegment(c.creditor_id, first_block, num_blocks, tuple(resp.blocks))
        return None

    def release(self, seq_id: str) -> None:
        for holder in self._held.pop(seq_id, {}):
            stream = self._streams.get(holder)
            if stream is not None and stream.broken is None:
                stream.send(release=pb.Release(seq_ids=[seq_id]))  # answered in order; unread

    def begin_step(self, holder_id: str, slices: list[SeqSlice]) -> None:
        self._control(holder_id).send(
            want_answer=False,
            step=pb.StepBegin(
                seqs=[
                    pb.SeqSlice(
                        seq_id=s.seq_id,
                        q_start=s.q_start,
                        num_q=s.num_q,
                        write_start=s.write_start,
                        num_write=s.num_write,
                    )
                    for s in slices
                ]
            ),
        )

    def send_layer(self, holder_id, layer, q, k, v) -> _Partial:
        stream = self._live(holder_id)
        link = stream.ipc
        shared = link is not None and (q.is_cuda or link[0].event is None)
        if shared and max(len(q), len(k)) <= link[0].rows:
            qb, kb, vb = link[0].regions
            qb[: len(q)].copy_(q)
            kb[: len(k)].copy_(k)
            vb[: len(v)].copy_(v)
            return self.send_ready(holder_id, layer, len(q), len(k))
        msg = pb.LayerBatch(layer=layer)
        q, k, v = to_host(q, k, v)
        tensor_to_pb(q, msg.q)
        tensor_to_pb(k, msg.k)
        tensor_to_pb(v, msg.v)
        return self._send(holder_id, msg)

    def buffers(self, holder_id: str) -> tuple[list, list, int] | None:
        """The shared buffers of a holder on this host with a local link: ((q, k, v) regions
        this side writes, (out, lse) regions it answers in, and an id that changes when the
        buffers do), or None."""
        stream = self._streams.get(holder_id)
        if stream is None or stream.ipc is None or holder_id not in self._links:
            return None
        mine, theirs = stream.ipc
        return mine.regions, theirs.regions, id(theirs)

    def send_ready(self, holder_id: str, layer: int, num_q: int, num_kv: int) -> _Partial:
        """A layer batch already written to the holder's shared buffer (buffers()): announce
        it; the partial comes back in the holder's buffer."""
        mine, theirs = self._live(holder_id).ipc
        mine.ready()
        msg = pb.LayerBatch(layer=layer, ipc=True)
        spec = self.ipc
        for rows, heads, field_ in (
            (num_q, spec.num_heads, msg.q), (num_kv, spec.num_kv_heads, msg.k),
            (num_kv, spec.num_kv_heads, msg.v),
        ):  # fmt: skip
            field_.layout.CopyFrom(tensor_spec(spec.dtype, (rows, heads, spec.head_dim)).to_pb())
        return self._send(holder_id, msg, theirs, num_q)

    def _send(self, holder_id: str, msg: pb.LayerBatch, ipc=None, num_q: int = 0) -> _Partial:
        link = self._links.get(holder_id)
        if link is not None:
            return _Partial(link.send(layer=msg), holder_id, self.timeout_s, ipc, num_q, link,
                            self.host_wait)  # fmt: skip
        return _Partial(self._live(holder_id).send(layer=msg), holder_id, self.timeout_s, ipc,
                        num_q, host_wait=self.host_wait)  # fmt: skip

    def _control(self, holder_id: str):
        """Where a holder's steps and layer batches go: its local link, or its stream."""
        stream = self._live(holder_id)
        return self._links.get(holder_id, stream)

    def lendable(self) -> int | None:
        creditors = self._creditors()
        if creditors is None:
            return None
        caps = {
            c.creditor_id: min(c.lend_cap, c.capacity)
            for c in creditors
            if c.creditor_id != self.borrower_id
        }
        # A creditor this decoder still has a live stream to is there even if the ledger lost
        # it for a moment (a Redis restart, before its heartbeat puts it back).
        for hid, cap in self._caps.items():
            stream = self._streams.get(hid)
            if hid not in caps and stream is not None and stream.broken is None:
                caps[hid] = cap
        return sum(caps.values())

    def _creditors(self) -> list | None:
        """The ledger's creditors of this KV layout, or None (said once per outage) when Redis
        can't be read."""
        try:
            creditors = self.ledger.creditors(self.layout)
        except Exception as e:
            if not self._ledger_down:
                log.warning("lending ledger unreachable: %s", e)
            self._ledger_down = True
            return None
        self._ledger_down = False
        return creditors

    def reclaimed(self) -> list[str]:
        with self._lock:
            out, self._reclaimed = self._reclaimed, []
        return out

    # -- the ledger as this borrower sees it -------------------------------------------------

    def borrowed(self) -> dict[str, int]:
        """Blocks borrowed now, by creditor."""
        out: dict[str, int] = {}
        for held in list(self._held.values()):
            for holder, n in list(held.items()):
                out[holder] = out.get(holder, 0) + n
        return out

    def close(self) -> None:
        for s in self._streams.values():
            s.close()
        self._streams.clear()
        for link in self._links.values():
            link.close()
        self._links.clear()

    # -- streams ------------------------------------------------------------------------------

    def _live(self, holder_id: str) -> SessionStream:
        stream = self._streams.get(holder_id)
        if stream is None:
            raise HolderLostError(holder_id, "no stream to it")
        link = self._links.get(holder_id)
        broken = stream.broken or (link.broken if link is not None else None)
        if broken is not None:
            self._forget(holder_id)
            raise HolderLostError(holder_id, broken)
        return stream

    def _stream(self, holder_id: str, address: str) -> SessionStream | None:
        stream = self._streams.get(holder_id)
        if stream is not None and stream.broken is None:
            return stream
        if stream is not None:
            self._forget(holder_id)
        stream = _stream_to(holder_id, address, self._on_reclaim)
        hello = pb.Hello(borrower_id=self.borrower_id, layout=self.layout)
        mine = self._offer_ipc(hello)
        hello.local = mine is not None
        hello.host_wait = self.host_wait
        hello.in_place = self.in_place_ok and mine is not None and mine.event is not None
        try:
            resp = stream.send(hello=hello).result(timeout=self.timeout_s)
        except (HolderLostError, FutureTimeout) as e:
            log.info("creditor %s unreachable: %s", holder_id, e)
            resp = None
        if resp is None or resp.code != OK:
            if resp is not None:
                log.warning("creditor %s refused this decoder: %s", holder_id, resp.message)
            stream.close()
            if mine is not None:
                mine.close()
            return None
        if mine is not None and resp.HasField("ipc"):
            spec = self.ipc
            layout = replica_layout(spec.num_heads, spec.head_dim)
            try:
                theirs = (
                    IpcBuffer.open_shm(resp.ipc, layout)
                    if resp.ipc.shm_path
                    else IpcBuffer.open(resp.ipc, layout)
                )
                stream.ipc = (mine, theirs)
                mine.unlink()  # the lender mapped it before answering
            except (OSError, RuntimeError, LookupError, ValueError) as e:
                log.info("no shared buffers with %s (%s): layer batches go as bytes", holder_id, e)
        if stream.ipc is None and mine is not None:
            mine.close()
        if stream.ipc is not None and resp.HasField("kv_pool"):
            try:
                self._pools[holder_id] = self._map_pool(resp.kv_pool)
            except (OSError, RuntimeError, LookupError, ValueError) as e:
                log.info("cannot map the pool of %s (%s): layer batches then", holder_id, e)
        if stream.ipc is not None and resp.local_socket:
            try:
                sock = local_link.connect(resp.local_socket, self.timeout_s)
                self._links[holder_id] = local_link.LinkClient(
                    sock, pb.AttentionRequest, pb.AttentionResponse.FromString,
                    lambda why: HolderLostError(holder_id, why),
                    lambda r: r.reclaim and self._on_reclaim(holder_id, list(r.reclaim)),
                )  # fmt: skip
            except OSError as e:
                log.info("no local link to %s (%s): steps go over the stream", holder_id, e)
        self._streams[holder_id] = stream
        return stream

    def _map_pool(self, handle) -> KVCache:
        spec = self.ipc
        raw = open_pool(handle)
        per_block = spec.num_layers * 2 * spec.block_size * spec.num_kv_heads * spec.head_dim
        data = raw.view(spec.dtype)
        if not per_block or data.numel() % per_block:
            raise ValueError(f"a pool of {data.numel()} elements is not whole blocks")
        return KVCache(data.view(spec.num_layers, 2, data.numel() // per_block, spec.block_size,
                                 spec.num_kv_heads, spec.head_dim))  # fmt: skip

    def in_place(self, holder_id: str) -> KVCache | None:
        pool = self._pools.get(holder_id)
        if pool is not None:
            self._live(holder_id)  # a lost holder raises: its blocks are recomputed
        return pool

    def _offer_ipc(self, hello: pb.Hello) -> IpcBuffer | None:
        spec = self.ipc
        if spec is None:
            return None
        layout = decoder_layout(spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.dtype)
        if spec.device.startswith("cuda"):
            mine = IpcBuffer.create(torch.device(spec.device), spec.rows, layout)
        else:
            try:
                mine = IpcBuffer.create_shm(spec.rows, layout)
            except OSError as e:  # no /dev/shm here: bytes then
                log.info("no shared memory for layer batches (%s)", e)
                return None
        assert mine.link is not None
        hello.ipc.CopyFrom(mine.link)
        return mine

    def _forget(self, holder_id: str) -> None:
        """A broken stream: the creditor freed (or lost) everything lent through it."""
        stream = self._streams.pop(holder_id, None)
        if stream is not None:
            stream.close()
        link = self._links.pop(holder_id, None)
        if link is not None:
            link.close()
        self._pools.pop(holder_id, None)
        for held in self._held.values():
            held.pop(holder_id, None)

    def _on_reclaim(self, holder_id: str, seq_ids: list[str]) -> None:
        with self._lock:
            self._reclaimed.extend(seq_ids)
