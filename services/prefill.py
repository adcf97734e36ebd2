"""PrefillService: prompt -> KV blocks in the store + the first token.

It runs prompts through its engine (chunked prefill, batched with whatever else is waiting),
publishes each request's KV blocks to its own in-process KV store shard (registered in the Redis
index like any holder) and pins them until decode has pulled them or the lease ends: DistServe's
pull model, where prefill's memory is the buffer and decode takes the KV when it has room.

    splitserve serve prefill --model DIR --port 0 --redis URL
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid

import grpc

from kvstore.block import BlockMeta, StoredBlock
from kvstore.device_pool import DevicePool
from kvstore.server import KVStoreServer
from protos.splitserve.v1 import common_pb2 as cpb
from protos.splitserve.v1 import prefill_pb2 as pb
from protos.splitserve.v1 import prefill_pb2_grpc as pb_grpc
from rpc.server import ServiceApp
from services.config import PrefillConfig
from services.engine.detokenizer import IncrementalDetokenizer
from services.engine.engine import LLMEngine
from services.engine.errors import InvalidRequestError
from services.engine.request import FinishReason
from services.engine_loop import EngineLoop, QueueFullError
from services.metrics import RequestMetrics, ServiceMetrics
from services.replica import ReplicaServer
from services.wire import device_meta, kv_to_stored, logprob_to_pb, sampling_from_pb

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Prefill"].full_name


class PrefillServicer(pb_grpc.PrefillServicer):
    def __init__(
        self,
        loop: EngineLoop,
        kv: KVStoreServer,
        model_name: str,
        app: ServiceApp,
        pin_lease_ms: int = 30_000,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        self.loop = loop
        self.kv = kv
        self.model_name = model_name
        self.app = app
        self.pin_lease_ms = pin_lease_ms
        self.engine = loop.engine
        self.metrics = metrics or ServiceMetrics("prefill", model_name, loop)

    async def Prefill(self, request, context):
        rec = self.metrics.request(context)
        await self.app.admit(context, "prefill", self.model_name, request.model, rec.finish)
        with self.app.track(), rec:
            try:
                return await self._prefill(request, rec)
            except InvalidRequestError as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            except QueueFullError as e:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))

    async def _prefill(self, request, rec: RequestMetrics) -> pb.PrefillResponse:
        params = sampling_from_pb(request.sampling)
        prompt = [int(t) for t in request.prompt_token_ids]
        rid = request.request_id or uuid.uuid4().hex
        # Only the first token here; decode continues with the caller's full parameters.
        first = dataclasses.replace(params, max_tokens=1, min_tokens=min(params.min_tokens, 1))
        t0 = time.monotonic()
        final = None
        prio = int(request.priority)
        salt = request.cache_salt
        async for out in self.loop.generate(
            rid, prompt, first, export_kv=True, priority=prio, cache_salt=salt
        ):
            final = out
            rec.output(out)
        assert final is not None and final.finished
        t1 = time.monotonic()
        if final.finish_reason == FinishReason.STOP:
            finish = "stop"
        elif params.max_tokens == 1:
            finish = "length"
        else:
            finish = ""
        kv_blocks = final.kv_blocks or []
        refs, pin_id = [], ""
        if not finish:
            pin_id = uuid.uuid4().hex
            lease = (request.pin_lease_ms or self.pin_lease_ms) / 1000
            refs, new = await self._publish(kv_blocks, pin_id, lease)
        else:
            new = [b.meta for b in (await asyncio.to_thread(self._put_host, kv_blocks))[1]]
        t2 = time.monotonic()
        self.metrics.kv_published(new, t2 - t1)
        rec.finish(finish or "handoff")
        text = final.new_text
        if not finish and self.engine.tokenizer is not None:
            # The one-token run flushed the text its detokenizer held back (a character still
            # incomplete, a possible stop string's start); the request goes on in decode, which
            # holds that text still and emits it where it belongs: only the streamed part here.
            detok = IncrementalDetokenizer(
                self.engine.tokenizer.backend, prompt, params.stop, params.skip_special_tokens
            )
            text = detok.push(final.new_token_ids[0]).text_delta
        tok = final.logprobs[0] if final.logprobs else None
        queue_s = min(final.queue_time_s, t1 - t0)
        return pb.PrefillResponse(
            request_id=rid,
            first_token_id=final.new_token_ids[0],
            first_logprob=logprob_to_pb(tok) if tok is not None else None,
            first_text=text,
            finish_reason=finish,
            blocks=refs,
            pin_id=pin_id,
            holder_id=self.kv.holder_id,
            holder_address=self.kv.address,
            usage=cpb.Usage(
                prompt_tokens=len(prompt),
                completion_tokens=1,
                cached_tokens=final.num_cached_tokens,
            ),
            timings=cpb.Timings(
                queue_ms=queue_s * 1e3,
                prefill_ms=(t1 - t0 - queue_s) * 1e3,
                publish_ms=(t2 - t1) * 1e3,
            ),
        )

    async def _publish(self, kv_blocks, pin_id: str, lease_s: float):
        """The request's KV where decode will pull it, pinned under pin_id: the device pool
        when this server has one (a same-host decode copies GPU to GPU; others get bytes),
        the store's memory otherwise, and for what the pool has no room for. Returns the
        block refs and the blocks newly written (those already held moved no bytes)."""
        pool = self.kv.device_pool
        placed: set[bytes] = set()
        metas = [device_meta(b, self.engine.model_id) for b in kv_blocks]
        by_id = {m.block_id: m for m in metas}
        new: list[BlockMeta] = []
        if pool is not None:
            ids, fresh = await asyncio.to_thread(
                pool.put, [(m, b.kv) for m, b in zip(metas, kv_blocks, strict=True)],
                pin_id, lease_s,
            )  # fmt: skip
            placed = set(ids)
            new = [by_id[i] for i in fresh]
        host = [b for m, b in zip(metas, kv_blocks, strict=True) if m.block_id not in placed]
        held = set(placed)
        if host:
            stored, fresh_host = await asyncio.to_thread(self._put_host, host)
            new += [b.meta for b in fresh_host]
            _, pinned, _ = self.kv.store.pin([b.block_id for b in stored], lease_s, pin_id)
            held.update(pinned)
        refs = [
            cpb.BlockRef(
                block_id=m.block_id,
                num_tokens=len(m.token_ids),
                size=m.size,
                holder_id=self.kv.holder_id,
                address=self.kv.address,
            )
            for m in metas
            if m.block_id in held
        ]
        return refs, new

    def _put_host(self, kv_blocks) -> tuple[list[StoredBlock], list[StoredBlock]]:
        """Blocks into the store's memory (device -> host bytes); returns those held and those
        newly written."""
        blocks = [kv_to_stored(b, self.engine.model_id) for b in kv_blocks]
        results = self.kv.store.put_many(blocks)
        pairs = list(zip(blocks, results, strict=True))
        return [b for b, r in pairs if r.status != "no_space"], [
            b for b, r in pairs if r.status == "ok"
        ]


class PrefillServer(ReplicaServer):
    """A prefill replica: engine, in-process KV shard, gRPC service, registration."""

    config: PrefillConfig

    def __init__(self, config: PrefillConfig, engine: LLMEngine | None = None) -> None:
        super().__init__(config, engine)
        self.kv = KVStoreServer(
            config.shard(self.replica_id),
            device_pool=make_device_pool(self.engine, config.device_pool_bytes),
        )
        self.metrics.watch_store(self.kv.store.stats)

    async def start(self) -> str:
        app = self._bind()
        app.add(self.kv.attach(app.server, app.address))
        servicer = PrefillServicer(self.loop, self.kv, self.model_name, app,
                                   self.config.pin_lease_ms, self.metrics)  # fmt: skip
        pb_grpc.add_PrefillServicer_to_server(servicer, app.server)
        app.add(SERVICE_NAME)
        await app.start()
        await self.kv.begin()
        self._announce(holder_id=self.replica_id)
        return self.address

    async def stop(self, drain_s: float = 30.0) -> None:
        """Drain: refuse new prompts, finish those in flight, keep serving KV until decoders
        have pulled what is pinned (or the drain time ends), then leave the registry."""
        deadline = time.monotonic() + drain_s
        await self.app.drain(drain_s)
        self._leave_registry()
        pool = self.kv.device_pool
        while (
            self.kv.store.stats().pinned_blocks or (pool is not None and pool.pinned_blocks)
        ) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await self.kv.stop()
        await self._close()


def make_device_pool(engine: LLMEngine, nbytes: int | None) -> DevicePool | None:
    import torch

    device = engine.kv_block_layout().device
    if torch.device(device).type != "cuda":
        return None
    nbytes = 2 << 30 if nbytes is None else nbytes
    if nbytes <= 0:
        return None
    try:
        return DevicePool(nbytes, device)
    except torch.cuda.OutOfMemoryError:
        # The engine sized its KV cache first; without room for the pool, hand-offs go
        # through the store's host memory as on a CPU (slower, same bytes).
        log.warning("no GPU memory for a %d MiB device pool: KV hand-off through host memory",
                    nbytes >> 20)  # fmt: skip
        return None
