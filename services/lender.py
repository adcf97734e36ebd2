"""The lending side of a replica: KV blocks lent to decoders, and attention over them.

A decode replica short of KV memory borrows blocks from a creditor (found through the Redis
lending ledger), then, every step, sends its layer batches: the queries and new K/V of the
sequences whose blocks the creditor holds. The creditor stores the K/V and returns each
query's partial attention with its log-sum-exp; the decoder merges them with its own
(DistAttention, Infinite-LLM). Creditors are attention replicas (services/attention.py: a pool
of their own, no weights) and decode replicas that lend the free blocks of their engine's pool.

One bidirectional stream per decoder; requests are handled in order, one response each; a bad
request gets its own error code and harms nothing else. When a decoder's stream ends, what it
borrowed is freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch

from kvstore.cuda_ipc import share_buffer
from kvstore.lending import CreditorInfo, Ledger
from kvstore.shm_layout import host_id
from protos.splitserve.v1 import attention_pb2 as pb
from protos.splitserve.v1 import attention_pb2_grpc as pb_grpc
from rpc.server import ServiceApp
from services import local_link
from services.engine.errors import InvalidRequestError
from services.engine.kv_holder import KVHolder, LendRefused, SegmentError, UnknownSequenceError
from services.engine.remote_kv import SeqSlice
from services.ipc_link import IpcBuffer, decoder_layout, replica_layout, use_device
from services.wire import tensor_from_pb, tensor_to_pb, to_host

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Attention"].full_name


async def _at_once(fn: Callable[[], Any]) -> Any:
    return fn()


@dataclass
class _Session:
    borrower: str = ""
    reclaim: list[str] = field(default_factory=list)  # told on the next response
    ipc: tuple[IpcBuffer, IpcBuffer] | None = None  # (the decoder's buffer, ours)
    link: local_link.LinkServer | None = None  # steps and layer batches, once asked for
    host_wait: bool = False  # as the decoder said at Hello


def _tell_reclaim(sess: _Session, resp: pb.AttentionResponse) -> pb.AttentionResponse:
    if sess.reclaim:
        asked, sess.reclaim[:] = list(sess.reclaim), []
        resp.reclaim.extend(asked)
    return resp


class AttentionServicer(pb_grpc.AttentionServicer):
    def __init__(self, lender: Lender) -> None:
        self.s = lender

    async def Session(self, request_iterator, context):
        sess = _Session()
        try:
            async for req in request_iterator:
                yield _tell_reclaim(sess, await self.s.handle(sess, req))
        finally:
            if sess.borrower:
                await self.s.drop_borrower(sess)

    async def Stats(self, request, context):
        h = self.s.holder
        return pb.AttentionStats(
            holder_id=self.s.holder_id,
            num_blocks=h.capacity,
            lend_cap=h.lend_cap,
            lent=h.lent,
            lent_to=h.lent_to(),
            layer_batches=self.s.layer_batches,
            layer_seconds=self.s.layer_seconds,
        )

    async def Reclaim(self, request, context):
        return pb.ReclaimResponse(asked=self.s.reclaim(request.keep_lent))


class Lender:
    """The lending side of a replica: its KVHolder's blocks lent to decoders over the Attention
    service, its entry in the lending ledger, and attention over what it lent.

    pool_op runs a change to the holder's pool where the pool's owner allows it: at once for an
    attention replica's own pool; on the engine's thread for a decode replica lending free
    blocks of its engine's pool. borrowing: a replica that is borrowing lends nothing (no
    recursive borrowing)."""

    def __init__(
        self,
        holder: KVHolder,
        holder_id: str,
        layout: str,
        pool_op: Callable[[Callable[[], Any]], Awaitable[Any]] | None = None,
        borrowing: Callable[[], bool] | None = None,
    ) -> None:
        self.holder = holder
        self.holder_id = holder_id
        self.layout = layout
        self.pool_op = pool_op or _at_once
        self.borrowing = borrowing
        self.layer_batches = 0
        self.layer_seconds = 0.0
        self.ledger: Ledger | None = None
        self.address = ""
        self._sessions: dict[str, _Session] = {}
        self._beat: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def add_to(self, app: ServiceApp) -> None:
        pb_grpc.add_AttentionServicer_to_server(AttentionServicer(self), app.server)
        app.add(SERVICE_NAME)

    @property
    def num_sessions(self) -> int:
        return len(self._sessions)

    async def start_ledger(self, cluster, address: str) -> None:
        """Announce this creditor in the ledger and keep its entry alive."""
        self.address = address
        self._loop = asyncio.get_running_loop()
        self.ledger = Ledger(cluster.redis_url, cluster.namespace, cluster.ttl_s)
        self.ledger.announce(self._info())
        self._beat = asyncio.create_task(self._heartbeat(cluster.heartbeat_s))

    async def stop_ledger(self) -> None:
        if self._beat is not None:
            self._beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._beat
        if self.ledger is not None:
            with contextlib.suppress(Exception):
                self.ledger.withdraw(self.holder_id)
            self.ledger.close()

    def _info(self) -> CreditorInfo:
        h = self.holder
        return CreditorInfo(
            self.holder_id, self.address, host_id(), self.layout, h.capacity, h.lend_cap, h.lent
        )

    async def _heartbeat(self, every_s: float) -> None:
        assert self.ledger is not None
        while True:
            await asyncio.sleep(every_s)
            try:
                if not self.ledger.heartbeat(self.holder_id):
                    # Redis lost the entry (restart, flush): put back what is lent, to whom.
                    self.ledger.restore(self._info(), self.holder.lent_to())
            except Exception as e:  # Redis away: lending goes on; the entry comes back later
                log.warning("lending ledger heartbeat failed: %s", e)

    # -- requests (on the event loop; pool changes through pool_op) ---------------------------

    async def handle(self, sess: _Session, req: pb.AttentionRequest) -> pb.AttentionResponse:
        kind = req.WhichOneof("body")
        if kind in ("step", "layer"):
            return self.handle_now(sess, req)
        resp = pb.AttentionResponse(id=req.id)
        with _errors_to(resp):
            if kind == "hello":
                self._hello(sess, req.hello, resp)
            elif not sess.borrower:
                raise _Refused(grpc.StatusCode.FAILED_PRECONDITION, "say hello first")
            elif kind == "borrow":
                resp.blocks.extend(await self._borrow(sess, req.borrow))
                resp.granted = len(resp.blocks)
            elif kind == "release":
                for sid in req.release.seq_ids:
                    await self._release(sess.borrower, sid)
            else:
                raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, "empty request")
        return resp

    def handle_now(self, sess: _Session, req: pb.AttentionRequest) -> pb.AttentionResponse:
        """A step or a layer batch, on the calling thread (the event loop's, or the session's
        local link's)."""
        resp = pb.AttentionResponse(id=req.id)
        with _errors_to(resp):
            kind = req.WhichOneof("body")
            if not sess.borrower:
                raise _Refused(grpc.StatusCode.FAILED_PRECONDITION, "say hello first")
            if kind == "step":
                slices = [
                    SeqSlice(s.seq_id, s.q_start, s.num_q, s.write_start, s.num_write)
                    for s in req.step.seqs
                ]
                self.holder.begin_step(sess.borrower, slices)
            elif kind == "layer":
                self._layer(sess, req.layer, resp)
            else:
                raise _Refused(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "only steps and layer batches go over the local link",
                )
        return resp

    def _hello(self, sess: _Session, hello: pb.Hello, resp: pb.AttentionResponse) -> None:
        if sess.borrower:
            raise _Refused(grpc.StatusCode.FAILED_PRECONDITION, "this stream already said hello")
        if not hello.borrower_id:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, "borrower_id is empty")
        if hello.layout != self.layout:
            raise _Refused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"this replica holds KV of layout {self.layout!r}, not {hello.layout!r}",
            )
        if hello.borrower_id in self._sessions:
            raise _Refused(
                grpc.StatusCode.ALREADY_EXISTS, f"{hello.borrower_id} already has a stream here"
            )
        sess.borrower = hello.borrower_id
        sess.host_wait = hello.host_wait
        self._sessions[sess.borrower] = sess
        if hello.HasField("ipc"):
            sess.ipc = self._ipc_link(hello.ipc)
            if sess.ipc is not None:
                resp.ipc.CopyFrom(sess.ipc[1].link)
                src, dst = sess.ipc
                self.holder.enable_graphs(sess.borrower, src.regions, dst.regions, src.rows)
                if hello.local:
                    resp.local_socket = self._serve_link(sess)
                if hello.in_place and self.holder.shareable:
                    data = self.holder.kv_cache.data
                    resp.kv_pool.CopyFrom(share_buffer(
                        data.view(-1).view(torch.uint8), f"kv-{self.holder_id}",
                        data.numel() * data.element_size(),
                    ))  # fmt: skip

    def _serve_link(self, sess: _Session) -> str:
        """A local socket for this session's steps and layer batches, served by its own thread
        (the holder's pool changes stay on the event loop)."""
        sess.link = local_link.LinkServer(
            sess.borrower, pb.AttentionRequest.FromString,
            lambda req: [_tell_reclaim(sess, self.handle_now(sess, req))],
            lambda: use_device(self.holder.device),
        )  # fmt: skip
        return sess.link.path

    def _ipc_link(self, theirs: pb.IpcLink) -> tuple[IpcBuffer, IpcBuffer] | None:
        """Map the decoder's buffer and make ours (CUDA IPC for a GPU pool, shared memory for
        a CPU one), or None (bytes) where this host can't."""
        h = self.holder
        cfg = h.cfg
        src_layout = decoder_layout(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, h.dtype)
        dst_layout = replica_layout(cfg.num_heads, cfg.head_dim)
        on_gpu = str(h.device).startswith("cuda")
        try:
            if theirs.shm_path and not on_gpu:
                src = IpcBuffer.open_shm(theirs, src_layout)
                return src, IpcBuffer.create_shm(theirs.rows, dst_layout)
            if theirs.HasField("buffer") and on_gpu:
                src = IpcBuffer.open(theirs, src_layout)
                return src, IpcBuffer.create(src.buf.device, theirs.rows, dst_layout)
        except (OSError, RuntimeError, LookupError, ValueError) as e:
            log.info("no shared buffers with this decoder (%s): layer batches go as bytes", e)
        return None

    async def _borrow(self, sess: _Session, b: pb.Borrow) -> list[int]:
        """Lend the blocks; returns the pool blocks lent, in logical order."""
        h = self.holder
        if self.borrowing is not None and self.borrowing():
            raise LendRefused("this replica is borrowing itself: it lends nothing meanwhile")
        why = await self.pool_op(lambda: h.can_lend(b.num_blocks))
        if why is not None:
            raise LendRefused(why)
        if self.ledger is not None:
            try:
                ok = self.ledger.try_lend(self.holder_id, sess.borrower, b.num_blocks)
            except Exception as e:
                raise _Refused(grpc.StatusCode.UNAVAILABLE, f"lending ledger: {e}") from None
            if not ok:
                raise LendRefused("the ledger's lend cap is reached")
        try:
            await self.pool_op(lambda: h.lend(sess.borrower, b.seq_id, b.first_block, b.num_blocks))
        except Exception:
            self._repay(sess.borrower, b.num_blocks)
            raise
        return h.physical(sess.borrower, b.seq_id, b.first_block, b.num_blocks)

    async def _release(self, borrower: str, seq_id: str) -> None:
        self._repay(borrower, await self.pool_op(lambda: self.holder.release(borrower, seq_id)))

    def _repay(self, borrower: str, n: int) -> None:
        if n and self.ledger is not None:
            try:
                self.ledger.repay(self.holder_id, borrower, n)
            except Exception as e:  # the heartbeat's restore corrects it once Redis is back
                log.warning("lending ledger repay failed: %s", e)

    def _layer(self, sess: _Session, layer: pb.LayerBatch, resp: pb.AttentionResponse) -> None:
        t0 = time.perf_counter()
        if layer.ipc:
            self._layer_ipc(sess, layer, resp)
        else:
            q = tensor_from_pb(layer.q, "q")
            k = tensor_from_pb(layer.k, "k")
            v = tensor_from_pb(layer.v, "v")
            out, lse = self.holder.attend(sess.borrower, int(layer.layer), q, k, v)
            out, lse = to_host(out, lse)  # one copy to the host: the work is done after this
            tensor_to_pb(out, resp.layer.out)
            tensor_to_pb(lse, resp.layer.lse)
        self.layer_batches += 1
        self.layer_seconds += time.perf_counter() - t0

    def _layer_ipc(self, sess: _Session, layer: pb.LayerBatch, resp) -> None:
        """The batch is in the decoder's buffer: once it is there (this thread or our GPU
        stream waits for the decoder's event, as its Hello said), compute (one CUDA graph
        replay for a decode step that has them), write the partials to our buffer and announce
        them."""
        if sess.ipc is None:
            raise SegmentError("an IPC layer batch on a stream without an IPC link")
        src, dst = sess.ipc
        dst.unlink()  # the decoder mapped it when we said hello
        q_rows = _rows(layer.q, "q")
        kv_rows = _rows(layer.k, "k")
        if q_rows > src.rows or kv_rows > src.rows or _rows(layer.v, "v") != kv_rows:
            raise SegmentError(f"an IPC batch of {q_rows} q and {kv_rows} k/v rows does not fit")
        src.wait(host=sess.host_wait)
        if not self.holder.replay(sess.borrower, int(layer.layer), q_rows, kv_rows):
            q, k, v = src.regions[0][:q_rows], src.regions[1][:kv_rows], src.regions[2][:kv_rows]
            out, lse = self.holder.attend(sess.borrower, int(layer.layer), q, k, v)
            dst.regions[0][:q_rows].copy_(out)
            dst.regions[1][:q_rows].copy_(lse)
        dst.ready()
        resp.layer.ipc = True
        resp.layer.out.layout.CopyFrom(layer.q.layout)
        resp.layer.out.layout.dtype = "float32"
        resp.layer.lse.layout.dtype = "float32"
        resp.layer.lse.layout.shape.extend([q_rows, self.holder.cfg.num_heads])

    async def drop_borrower(self, sess: _Session) -> None:
        """Its stream ended: free what it borrowed."""
        self._sessions.pop(sess.borrower, None)
        if sess.link is not None:
            # Before anything is freed its thread must be out of the holder. That takes a
            # moment (a layer batch at most), and done here, before the first await, it also
            # runs when the server is stopping and cancels this stream.
            sess.link.close()
        self.holder.disable_graphs(sess.borrower)
        for buf in sess.ipc or ():
            buf.close()
        n = await self.pool_op(lambda: self.holder.release_owner(sess.borrower))
        if n and self.ledger is not None:
            with contextlib.suppress(Exception):
                self.ledger.repay_all(self.holder_id, sess.borrower)

    def reclaim(self, keep_lent: int) -> int:
        """Lower the lend cap to keep_lent and ask borrowers for the blocks above it, biggest
        sequences first."""
        h = self.holder
        h.lend_cap = min(h.lend_cap, keep_lent)
        if self.ledger is not None:
            with contextlib.suppress(Exception):
                self.ledger.set_lend_cap(self.holder_id, h.lend_cap)
        return self._ask(h.lent - keep_lent)

    def ask_back(self, num_blocks: int) -> None:
        """The pool's owner is short (thread-safe): ask borrowers for about num_blocks back
        without lowering the cap for good."""
        if self._loop is not None and self._sessions:
            self._loop.call_soon_threadsafe(self._ask, num_blocks)

    def _ask(self, num_blocks: int) -> int:
        """Name sequences to give back, biggest first, until about num_blocks are asked for."""
        h = self.holder
        asked = 0
        held = sorted(
            ((h.held_blocks(o, s), o, s) for o in self._sessions for s in h.seqs_of(o)),
            reverse=True,
        )
        for n, owner, seq in held:
            if asked >= num_blocks:
                break
            if seq not in self._sessions[owner].reclaim:
                self._sessions[owner].reclaim.append(seq)
            asked += n
        return asked


def _rows(t: pb.Tensor, name: str) -> int:
    shape = t.layout.shape
    if not shape or shape[0] < 0:
        raise SegmentError(f"{name}: no rows in shape {list(shape)}")
    return int(shape[0])


@contextlib.contextmanager
def _errors_to(resp: pb.AttentionResponse):
    """A request's failure becomes its response's code; nothing else is harmed."""
    try:
        yield
    except UnknownSequenceError as e:
        _fail(resp, grpc.StatusCode.NOT_FOUND, str(e))
    except (SegmentError, InvalidRequestError) as e:
        _fail(resp, grpc.StatusCode.INVALID_ARGUMENT, str(e))
    except LendRefused as e:
        _fail(resp, grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
    except _Refused as e:
        _fail(resp, e.code, str(e))


class _Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def _fail(resp: pb.AttentionResponse, code: grpc.StatusCode, message: str) -> None:
    resp.code = code.value[0]
    resp.message = message
