"""DecodeService: KV blocks -> token stream.

Given a prefilled request (prompt token ids, first token, block references), it takes the
blocks it already holds from its own prefix cache, pulls only the rest through the KV store
(from whichever holder has them), admits the sequence to its running batch, and streams tokens.
Blocks that can't be fetched (holder gone, evicted) are computed again here: the same tokens,
only slower. In colocated mode the same server also takes requests with no prefill behind them
and computes the prompt itself: the baseline that disaggregation is measured against.

    splitserve serve decode --model DIR --port 0 --redis URL
    splitserve serve colocated --model DIR --port 0 [--redis URL]
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

import grpc
import torch

from kvstore.client import KVStoreClient
from kvstore.lending import Ledger
from kvstore.registry import list_replicas
from protos.splitserve.v1 import common_pb2 as cpb
from protos.splitserve.v1 import decode_pb2 as pb
from protos.splitserve.v1 import decode_pb2_grpc as pb_grpc
from rpc.server import ServiceApp
from services.attention_client import AttentionPeers, layout_key
from services.config import DecodeConfig
from services.engine.block_hash import hash_blocks
from services.engine.engine import LLMEngine
from services.engine.errors import InvalidRequestError
from services.engine.kv_holder import KVHolder
from services.engine.kv_transfer import KVBlock
from services.engine_loop import EngineLoop, KVCapacityError, QueueFullError
from services.lender import Lender
from services.metrics import RequestMetrics, ServiceMetrics
from services.offload_client import AttentionWorkers, forget_placement, record_placement
from services.offload_metrics import OffloadCollector
from services.replica import ReplicaServer
from services.store_tier import StoreTier
from services.wire import logprob_to_pb, sampling_from_pb, stored_to_kv

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Decode"].full_name


class DecodeServicer(pb_grpc.DecodeServicer):
    def __init__(
        self,
        loop: EngineLoop,
        kv: KVStoreClient | None,
        model_name: str,
        app: ServiceApp,
        colocated: bool,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        self.loop = loop
        self.kv = kv
        self.model_name = model_name
        self.app = app
        self.colocated = colocated
        self.engine = loop.engine
        role = "colocated" if colocated else "decode"
        self.metrics = metrics or ServiceMetrics(role, model_name, loop)
        self._tasks: set[asyncio.Task] = set()  # unpins in flight (held so they aren't collected)

    async def Decode(self, request, context):
        rec = self.metrics.request(context)
        await self.app.admit(context, "decode", self.model_name, request.model, rec.finish)
        with self.app.track(), rec:
            try:
                async for msg in self._decode(request, rec):
                    yield msg
            except InvalidRequestError as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            except (QueueFullError, KVCapacityError) as e:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))

    async def _decode(self, request, rec: RequestMetrics):
        params = sampling_from_pb(request.sampling)
        prompt = [int(t) for t in request.prompt_token_ids]
        rid = request.request_id or uuid.uuid4().hex
        timings = cpb.Timings()
        kwargs: dict = {}
        # A resumption carries every token already delivered; a hand-off, the first.
        done = [int(t) for t in request.resume_token_ids]
        if not done and request.HasField("first_token_id"):
            done = [int(request.first_token_id)]
        if done:
            bad = next((t for t in done if not 0 <= t < self.engine.vocab_size), None)
            if bad is not None:
                what = "resume_token_ids" if request.resume_token_ids else "first_token_id"
                raise InvalidRequestError(f"{what} has token {bad}, outside the vocabulary")
            if not prompt:
                raise InvalidRequestError("prompt is empty: give at least one token")
            t0 = time.monotonic()
            with self.loop.admitting():
                kv_blocks, stored = await self._pull(
                    prompt, list(request.blocks), timings, request.cache_salt
                )
            timings.transfer_ms = (time.monotonic() - t0) * 1e3
            self.metrics.kv_pulled(timings)
            if request.pin_id and request.pin_holder_address and self.kv is not None:
                task = asyncio.create_task(self._unpin(request.pin_holder_address, request.pin_id))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            kwargs = {"output_token_ids": done, "kv_blocks": kv_blocks, "stored_blocks": stored}
        elif not self.colocated:
            raise InvalidRequestError(
                "this decode server continues prefilled requests: send first_token_id and the "
                "prefill's block references, or resume_token_ids (or use a colocated server)"
            )
        kwargs["priority"] = int(request.priority)
        kwargs["cache_salt"] = request.cache_salt
        t_submit = time.monotonic()
        sent_first = False
        async for out in self.loop.generate(rid, prompt, params, **kwargs):
            rec.output(out)
            msg = pb.DecodeResponse(
                token_ids=out.new_token_ids,
                text=out.new_text,
                logprobs=[logprob_to_pb(t) for t in out.logprobs],
            )
            if not sent_first:
                timings.queue_ms = out.queue_time_s * 1e3
                timings.admission_ms = (time.monotonic() - t_submit) * 1e3
                msg.timings.CopyFrom(timings)
                sent_first = True
            if out.finished:
                msg.finish_reason = str(out.finish_reason)
                rec.finish(msg.finish_reason)
                msg.usage.CopyFrom(
                    cpb.Usage(
                        prompt_tokens=len(prompt),
                        completion_tokens=out.num_output_tokens,
                        # A resumption's cache hits may reach into its output: the
                        # prompt's share is what usage reports.
                        cached_tokens=min(out.num_cached_tokens, len(prompt)),
                    )
                )
            yield msg

    async def _pull(
        self, prompt: list[int], refs, timings, salt: str
    ) -> tuple[list[KVBlock | None], int]:
        """KV for the prompt's blocks: None where the prefix cache has it or it must be
        recomputed; pulled from the store otherwise. Blocks are named under the request's
        salt, so refs to another scope's blocks never match. Also: how many leading full
        blocks the store holds (the engine's KV tier fetches them after a preemption)."""
        e = self.engine
        expected = hash_blocks(
            prompt, e.block_size, e.model_id, include_partial=True, cache_salt=salt
        )
        usable = 0  # refs must name exactly the prompt's blocks, in order
        while usable < min(len(refs), len(expected)) and refs[usable].block_id == expected[usable]:
            usable += 1
        full = expected[: len(prompt) // e.block_size]
        hits = await self.loop.call(lambda eng: eng.prefix_cache_hits(full))
        hits = min(hits, usable)
        need = [bytes(r.block_id) for r in refs[hits:usable]]
        got = {}
        if need and self.kv is not None:
            res = await self.kv.get(need, source=refs[hits].holder_id or None)
            got = res.blocks
        layout = e.kv_block_layout()
        out: list[KVBlock | None] = [None] * hits
        for bid in need:
            s = got.get(bid)
            kv = stored_to_kv(s, e.model_id, layout) if s is not None else None
            if kv is None:
                timings.blocks_recomputed += 1
            else:
                timings.blocks_pulled += 1
                timings.bytes_pulled += s.meta.size
            out.append(kv)
        timings.blocks_recomputed += max(0, len(expected) - usable)
        return out, min(usable, len(full))

    async def _unpin(self, address: str, pin_id: str) -> None:
        assert self.kv is not None
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.TimeoutError):
            await self.kv.unpin(address, pin_id)


# How long a model worker waits at start for attention workers to hold all its KV heads.
OFFLOAD_WAIT_S = 300.0


class DecodeServer(ReplicaServer):
    """A decode (or colocated) replica: engine, KV store client, gRPC service, registration."""

    config: DecodeConfig

    def __init__(self, config: DecodeConfig, engine: LLMEngine | None = None) -> None:
        super().__init__(config, engine)
        self.colocated = config.colocated
        self.kv: KVStoreClient | None = None
        self.peers: AttentionPeers | None = None
        if config.borrow_kv:
            cluster = config.cluster
            assert cluster.redis_url is not None
            ledger = Ledger(cluster.redis_url, cluster.namespace, cluster.ttl_s)
            e = self.engine
            self.peers = AttentionPeers.for_engine(e, ledger, self.replica_id)
            e.attach_remote_kv(self.peers)  # before any request: the engine thread is idle
            self.metrics.watch_lending(borrowed=self.peers.borrowed)
        self.lender: Lender | None = None
        if config.lend_fraction > 0:
            self.lender = self._lender(config.lend_fraction)
        self.offload: AttentionWorkers | None = None
        if config.offload_workers:
            self.offload = self._offload(config)

    def _offload(self, config: DecodeConfig) -> AttentionWorkers:
        """Attention offload: the model's attention workers (from the registry) hold this
        model worker's KV heads; where they are is recorded in Redis."""
        e, cluster = self.engine, config.cluster
        assert cluster.redis_url is not None
        url, ns, name = cluster.redis_url, cluster.namespace, config.name

        def find() -> list[str]:
            return [r.address for r in list_replicas(url, "attention-offload", name, ns)]

        workers = AttentionWorkers(
            self.replica_id, e.model_config, layout_key(e.model_id, e.kv_block_layout()),
            e.num_kv_blocks, e.dtype, e.device, find, config.offload_workers,
            e.config.max_num_batched_tokens,
            on_placement=lambda p: record_placement(url, ns, self.replica_id, p),
        )  # fmt: skip
        self.metrics.registry.register(OffloadCollector("colocated", name, e.runner.counters))
        return workers

    def _lender(self, fraction: float) -> Lender:
        """Lend free blocks of the engine's own pool to other decode replicas: pool changes
        run on the engine's thread (between steps), attention over the lent blocks on the
        event loop (they are the borrower's alone). A chunk's worth of blocks stays free for
        this replica's own work, and when it runs short it asks its borrowers for blocks back;
        while it is borrowing itself it lends nothing."""
        e = self.engine
        holder = KVHolder(
            e.model_config, 0, e.block_size, e.dtype, e.device,
            lend_cap=int(fraction * e.num_kv_blocks), pool=e.pool, kv_cache=e.kv_cache,
            reserve=-(-e.config.max_num_batched_tokens // e.block_size),
        )  # fmt: skip
        peers = self.peers
        lender = Lender(
            holder, self.replica_id, layout_key(e.model_id, e.kv_block_layout()),
            pool_op=lambda fn: self.loop.call(lambda _engine: fn()),
            borrowing=(lambda: bool(peers.borrowed())) if peers is not None else None,
        )  # fmt: skip
        e.lent_blocks = holder.held_block_ids
        e.scheduler.on_short = lender.ask_back
        self.metrics.watch_lending(lent=holder.lent_to)
        return lender

    async def start(self) -> str:
        if self.offload is not None:
            # Attention workers may start after this replica (Ray starts roles together).
            await asyncio.to_thread(self.offload.connect, OFFLOAD_WAIT_S)
            self.engine.attach_shards(self.offload)  # before any request: the engine is idle
        app = self._bind()
        cluster = self.config.cluster
        if cluster.redis_url:
            # Channels belong to the event loop that uses them: made here, not in __init__.
            device = self.engine.kv_block_layout().device
            on_gpu = torch.device(device).type == "cuda"
            self.kv = KVStoreClient(
                cluster.redis_url, cluster.namespace, device=device if on_gpu else None
            )
            e = self.engine  # before any request: the engine thread is idle
            loop = asyncio.get_running_loop()
            e.attach_kv_tier(StoreTier(self.kv, loop, e.model_id, e.kv_block_layout()))
        servicer = DecodeServicer(self.loop, self.kv, self.model_name, app, self.colocated,
                                  self.metrics)  # fmt: skip
        pb_grpc.add_DecodeServicer_to_server(servicer, app.server)
        app.add(SERVICE_NAME)
        if self.lender is not None:
            self.lender.add_to(app)
        await app.start()
        if self.lender is not None:
            await self.lender.start_ledger(cluster, self.address)
        self._announce()
        return self.address

    async def stop(self, drain_s: float = 30.0) -> None:
        """Drain: refuse new requests, finish the running ones, then leave the registry."""
        await self.app.drain(drain_s)
        if self.lender is not None:
            await self.lender.stop_ledger()
        self._leave_registry()
        if self.kv is not None:
            await self.kv.close()
        await self._close()
        if self.peers is not None:
            self.peers.close()
            self.peers.ledger.close()
        if self.offload is not None:
            self.offload.close()
            with contextlib.suppress(Exception):
                cluster = self.config.cluster
                forget_placement(cluster.redis_url, cluster.namespace, self.replica_id)
