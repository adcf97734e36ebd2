"""The attention worker's side of attention offload: KV shards of model workers, over gRPC.

A model worker attaches once per stream, asking for a region: `num_blocks` blocks of a range
of KV heads. The region lives as long as the stream (a model worker that dies takes its
region with it; its sequences are recomputed elsewhere). Every step the model worker sends
each batch's layout, then per layer its heads' q, k, v; the answer is their attention output
in the model's dtype. On one host the tensors go through shared buffers (CUDA IPC with events
on GPUs, /dev/shm files on CPUs), one pair per batch tag; elsewhere as raw bytes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import grpc
import numpy as np
import torch

from protos.splitserve.v1 import offload_pb2 as pb
from protos.splitserve.v1 import offload_pb2_grpc as pb_grpc
from rpc.server import ServiceApp
from services import local_link
from services.engine.config import ModelConfig
from services.engine.errors import InvalidRequestError
from services.engine.kv_holder import SegmentError
from services.engine.kv_shard import KVShard
from services.engine.offload_plan import PrefillChunk, StepLayout
from services.ipc_link import IpcBuffer, decoder_layout, use_device
from services.wire import tensor_from_pb, tensor_to_pb, to_host

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["AttentionOffload"].full_name
Part = pb.OffloadLayer.Part


def shard_layouts(shard: KVShard):
    """(the model worker's buffer layout: q, k, v of the shard's heads; ours: o)."""
    c = shard.cfg
    return (
        decoder_layout(c.num_heads, c.num_kv_heads, c.head_dim, shard.dtype),
        [(shard.dtype, (c.num_heads, c.head_dim))],
    )


@dataclass
class _Session:
    worker_id: str = ""
    shard: KVShard | None = None
    ipc: list[tuple[IpcBuffer, IpcBuffer]] = field(default_factory=list)  # per tag
    q_ids: dict[tuple[int, int], int] = field(default_factory=dict)  # (tag, layer) -> Q's id
    link: local_link.LinkServer | None = None  # the local socket, once asked for


class OffloadHost:
    """The regions this attention worker holds for model workers, within its memory budget."""

    def __init__(
        self, cfg: ModelConfig, dtype: torch.dtype, device: str, block_size: int,
        budget_bytes: int, layout: str, worker_id: str, keep_s: float = 60.0,
    ) -> None:  # fmt: skip
        """keep_s: how long a region outlives its model worker's stream, for a replacement
        to adopt (0: freed at once)."""
        self.cfg = cfg
        self.dtype = dtype
        self.device = device
        self.block_size = block_size
        self.budget_bytes = budget_bytes
        self.layout = layout
        self.worker_id = worker_id
        self.sessions: dict[str, _Session] = {}
        self.keep_s = keep_s
        # Regions of model workers whose stream ended: worker id -> (kept until, the region).
        self.orphans: dict[str, tuple[float, KVShard]] = {}
        self.layer_batches = 0
        self.layer_seconds = 0.0

    @property
    def used_bytes(self) -> int:
        live = sum(s.shard.nbytes for s in list(self.sessions.values()) if s.shard is not None)
        return live + sum(shard.nbytes for _, shard in list(self.orphans.values()))

    def _purge(self) -> None:
        now = time.monotonic()
        for wid, (until, _) in list(self.orphans.items()):
            if until <= now:
                del self.orphans[wid]

    def add_to(self, app: ServiceApp) -> None:
        pb_grpc.add_AttentionOffloadServicer_to_server(_Servicer(self), app.server)
        app.add(SERVICE_NAME)

    def handle(self, sess: _Session, req: pb.OffloadRequest) -> list[pb.OffloadResponse]:
        """The responses this request completes (none for a Q part, two never)."""
        kind = req.WhichOneof("body")
        resp = pb.OffloadResponse(id=req.id)
        try:
            if kind == "attach":
                self._attach(sess, req.attach, resp)
            elif sess.shard is None:
                _fail(resp, grpc.StatusCode.FAILED_PRECONDITION, "attach first")
            elif kind == "step":
                sess.shard.begin_step(req.step.tag, layout_from_pb(req.step))
            elif kind == "layer":
                return self._layer(sess, req.layer, resp)
            elif kind == "load":
                ids = _ints(req.load.block_ids, "block_ids").tolist()
                sess.shard.load_blocks(ids, tensor_from_pb(req.load.kv, "kv"))
            else:
                _fail(resp, grpc.StatusCode.INVALID_ARGUMENT, "empty request")
        except (SegmentError, InvalidRequestError) as e:
            _fail(resp, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except _Refused as e:
            _fail(resp, e.code, str(e))
        return [resp]

    def _attach(self, sess: _Session, a: pb.Attach, resp: pb.OffloadResponse) -> None:
        if sess.shard is not None:
            raise _Refused(grpc.StatusCode.FAILED_PRECONDITION, "this stream already attached")
        if not a.worker_id:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, "worker_id is empty")
        if a.layout != self.layout:
            raise _Refused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"this worker holds KV of layout {self.layout!r}, not {a.layout!r}",
            )
        if a.worker_id in self.sessions:
            raise _Refused(grpc.StatusCode.ALREADY_EXISTS, f"{a.worker_id} is attached already")
        self._purge()
        heads = a.kv_head_end - a.kv_head_start
        if a.num_blocks < 1 or heads < 1 or a.kv_head_end > self.cfg.num_kv_heads:
            raise _Refused(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"bad region: {a.num_blocks} blocks of KV heads [{a.kv_head_start}, "
                f"{a.kv_head_end}) of {self.cfg.num_kv_heads}",
            )
        sess.shard = self._adopt(a, resp) if a.adopt else None
        if sess.shard is None:
            need = KVShard.bytes_for(self.cfg, heads, a.num_blocks, self.block_size, self.dtype)
            free = self.budget_bytes - self.used_bytes
            if need > free:
                raise _Refused(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{a.num_blocks} blocks of {heads} KV heads need {need} bytes; {free} are free",
                )
            sess.shard = KVShard(
                self.cfg, a.kv_head_start, a.kv_head_end, a.num_blocks, self.block_size,
                self.dtype, self.device,
            )  # fmt: skip
        sess.worker_id = a.worker_id
        self.sessions[a.worker_id] = sess
        for link in a.ipc:
            pair = self._ipc_pair(sess.shard, link)
            if pair is None:
                for _mine, theirs in sess.ipc:
                    theirs.close()
                sess.ipc = []
                break
            sess.ipc.append(pair)
        resp.ipc_links.extend(theirs.link for _, theirs in sess.ipc)
        if sess.ipc:
            sess.shard.enable_graphs(
                [mine.regions for mine, _ in sess.ipc], [theirs.regions for _, theirs in sess.ipc],
                min(p[0].rows for p in sess.ipc),
            )  # fmt: skip
        if a.local and sess.ipc:
            resp.local_socket = self._serve_link(sess)

    def _serve_link(self, sess: _Session) -> str:
        """A local socket for this session's per-layer traffic, served by its own thread."""
        sess.link = local_link.LinkServer(
            sess.worker_id, pb.OffloadRequest.FromString, lambda req: self.handle(sess, req),
            lambda: use_device(self.device),
        )  # fmt: skip
        return sess.link.path

    def _adopt(self, a: pb.Attach, resp: pb.OffloadResponse) -> KVShard | None:
        """The oldest kept region of these heads and size (of adopt_from, if named)."""
        fits = sorted(
            (until, wid) for wid, (until, shard) in self.orphans.items()
            if shard.heads == (a.kv_head_start, a.kv_head_end)
            and shard.num_blocks == a.num_blocks
            and (not a.adopt_from or wid == a.adopt_from)
        )  # fmt: skip
        if not fits:
            return None
        wid = fits[0][1]
        _, shard = self.orphans.pop(wid)
        resp.adopted_from = wid
        ids = np.array(list(shard.hashes), dtype=np.int64)
        resp.cached_blocks = ids.tobytes()
        resp.cached_hashes.extend(shard.hashes[int(b)] for b in ids)
        log.info("%s adopted the region of %s (%d cached blocks)", a.worker_id, wid, len(ids))
        return shard

    def _ipc_pair(self, shard: KVShard, link) -> tuple[IpcBuffer, IpcBuffer] | None:
        src_layout, dst_layout = shard_layouts(shard)
        on_gpu = torch.device(self.device).type == "cuda"
        try:
            if link.shm_path and not on_gpu:
                return IpcBuffer.open_shm(link, src_layout), IpcBuffer.create_shm(
                    link.rows, dst_layout
                )
            if link.HasField("buffer") and on_gpu:
                src = IpcBuffer.open(link, src_layout)
                return src, IpcBuffer.create(src.buf.device, link.rows, dst_layout)
        except (OSError, RuntimeError, LookupError, ValueError) as e:
            log.info("no shared buffers with this model worker (%s): bytes then", e)
        return None

    def _layer(self, sess: _Session, layer: pb.OffloadLayer, resp) -> list[pb.OffloadResponse]:
        t0 = time.perf_counter()
        shard = sess.shard
        assert shard is not None
        tag, li = int(layer.tag), int(layer.layer)
        pair = None
        if layer.ipc:
            if tag >= len(sess.ipc):
                raise SegmentError(f"an IPC layer batch of tag {tag} without a buffer for it")
            pair = sess.ipc[tag]
            pair[1].unlink()  # the model worker mapped it when we answered the attach
            pair[0].wait(host=True)
        if layer.part == Part.Q:
            q = self._tensor(pair, layer.q, 0, "q")
            sess.q_ids[(tag, li)] = resp.id
            try:
                shard.attend_q(tag, li, q)
            except (SegmentError, InvalidRequestError):
                sess.q_ids.pop((tag, li), None)
                raise
            return []
        if layer.part == Part.KV:
            qid = sess.q_ids.pop((tag, li), None)
            if qid is None:
                raise SegmentError(f"k, v of tag {tag} layer {li} came before its q")
            resp.id = qid
            out = shard.attend_kv(
                tag, li, self._tensor(pair, layer.k, 1, "k"), self._tensor(pair, layer.v, 2, "v")
            )
        elif pair is not None and self._replayed(shard, pair, layer, tag, li):
            # The graph read q, k, v from the shared buffer and wrote o into ours.
            pair[1].ready()
            resp.ipc = True
            resp.out.layout.CopyFrom(layer.q.layout)
            self.layer_batches += 1
            self.layer_seconds += time.perf_counter() - t0
            return [resp]
        else:
            out = shard.attend(
                tag, li, self._tensor(pair, layer.q, 0, "q"), self._tensor(pair, layer.k, 1, "k"),
                self._tensor(pair, layer.v, 2, "v"),
            )  # fmt: skip
        if pair is not None:
            dst = pair[1]
            dst.regions[0][: len(out)].copy_(out)
            dst.ready()
            resp.ipc = True
            resp.out.layout.CopyFrom(layer.q.layout if layer.part == Part.ALL else layer.k.layout)
            resp.out.layout.shape[:] = list(out.shape)
        else:
            tensor_to_pb(to_host(out)[0], resp.out)
        self.layer_batches += 1
        self.layer_seconds += time.perf_counter() - t0
        return [resp]

    def _replayed(self, shard: KVShard, pair, layer: pb.OffloadLayer, tag: int, li: int) -> bool:
        """Ran the layer as the shard's CUDA graph over the shared buffers (their shapes checked
        as op by op); False if this batch has none."""
        for i, (t, name) in enumerate(((layer.q, "q"), (layer.k, "k"), (layer.v, "v"))):
            self._tensor(pair, t, i, name)
        return shard.replay(tag, li, _rows(layer.q))

    @staticmethod
    def _tensor(pair, msg, region: int, name: str) -> torch.Tensor:
        if pair is None:
            return tensor_from_pb(msg, name)
        shape = tuple(msg.layout.shape)
        buf = pair[0].regions[region]
        if len(shape) != buf.dim() or shape[1:] != tuple(buf.shape[1:]) or shape[0] > len(buf):
            raise SegmentError(f"{name}: shape {shape} does not fit the shared buffer")
        return buf[: shape[0]]

    def detach(self, sess: _Session) -> None:
        """Its stream ended: free the region (once its local link's thread is out of it)."""
        if sess.link is not None:
            sess.link.close()
        if sess.worker_id and self.sessions.get(sess.worker_id) is sess:
            del self.sessions[sess.worker_id]
        for _, theirs in sess.ipc:
            theirs.close()
        if sess.shard is not None and self.keep_s > 0:
            sess.shard.forget_steps()
            self.orphans[sess.worker_id] = (time.monotonic() + self.keep_s, sess.shard)
        self._purge()
        sess.shard = None
        sess.ipc = []


class _Servicer(pb_grpc.AttentionOffloadServicer):
    def __init__(self, host: OffloadHost) -> None:
        self.h = host

    async def Session(self, request_iterator, context):
        sess = _Session()
        try:
            async for req in request_iterator:
                for resp in self.h.handle(sess, req):
                    yield resp
        finally:
            # Off the event loop: it waits for the session's local-link thread to leave.
            await asyncio.to_thread(self.h.detach, sess)

    async def Stats(self, request, context):
        h = self.h
        return pb.OffloadStats(
            worker_id=h.worker_id, budget_bytes=h.budget_bytes, used_bytes=h.used_bytes,
            model_workers=len(h.sessions), layer_batches=h.layer_batches,
            layer_seconds=h.layer_seconds,
        )  # fmt: skip


def layout_to_pb(tag: int, lay: StepLayout) -> pb.StepLayout:
    return pb.StepLayout(
        tag=tag,
        num_decode=lay.num_decode,
        slot_mapping=_raw(lay.slot_mapping),
        decode_table=_raw(lay.decode_table),
        table_width=lay.decode_table.shape[1] if lay.decode_table.ndim == 2 else 0,
        decode_lens=_raw(lay.decode_lens),
        prefills=[
            pb.PrefillChunk(
                query_start=p.query_start,
                num_query=p.num_query,
                seq_len=p.seq_len,
                table=b"" if p.table is None else _raw(p.table),
            )
            for p in lay.prefills
        ],
        q_first=lay.q_first,
        cached_blocks=np.array([b for b, _ in lay.cached], dtype=np.int64).tobytes(),
        cached_hashes=[h for _, h in lay.cached],
    )


def layout_from_pb(m: pb.StepLayout) -> StepLayout:
    nd, width = int(m.num_decode), int(m.table_width)
    table = _ints(m.decode_table, "decode_table")
    if table.size != nd * width:
        raise SegmentError(f"decode_table has {table.size} ids, not {nd} x {width}")
    lens = _ints(m.decode_lens, "decode_lens")
    cached_ids = _ints(m.cached_blocks, "cached_blocks").tolist()
    if len(cached_ids) != len(m.cached_hashes):
        raise SegmentError(f"{len(cached_ids)} cached blocks, {len(m.cached_hashes)} hashes")
    return StepLayout(
        nd, _ints(m.slot_mapping, "slot_mapping"), table.reshape(nd, width), lens,
        tuple(
            PrefillChunk(p.query_start, p.num_query, p.seq_len,
                         _ints(p.table, "table") if p.table else None)
            for p in m.prefills
        ),
        bool(m.q_first), tuple(zip(cached_ids, m.cached_hashes, strict=True)),
    )  # fmt: skip


def _rows(t: pb.Tensor) -> int:
    return int(t.layout.shape[0]) if t.layout.shape else -1


def _raw(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a, dtype=np.int64).tobytes()


def _ints(b: bytes, name: str) -> np.ndarray:
    if len(b) % 8:
        raise SegmentError(f"{name}: {len(b)} bytes is not a whole number of int64")
    return np.frombuffer(b, dtype=np.int64).copy()  # writable: torch takes it as is


class _Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def _fail(resp: pb.OffloadResponse, code: grpc.StatusCode, message: str) -> None:
    resp.code = code.value[0]
    resp.message = message
