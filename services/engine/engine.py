"""The engine: add requests, step, get outputs. One step is schedule -> run -> postprocess.

Single-threaded by contract: callers (the services) serialize add_request/abort/step.

On a CUDA device with async scheduling, step() schedules and launches step n+1, then reads
step n's sampled tokens and returns step n's outputs: the CPU's scheduling and bookkeeping
overlap the GPU's work. Tokens in flight are counted by the scheduler as pending; a step whose
sampling needs their values (penalties) waits for them first.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from services.engine.assembly import build_model, build_runner, pool_blocks
from services.engine.block_hash import BlockHash, model_fingerprint
from services.engine.block_pool import BlockPool, PoolUsage
from services.engine.completion import Completion
from services.engine.config import EngineConfig, ModelConfig
from services.engine.detokenizer import IncrementalDetokenizer
from services.engine.errors import InvalidRequestError
from services.engine.fused_ops import triton_available
from services.engine.integrity import check_engine
from services.engine.kv_cache import KVCache
from services.engine.kv_tier import KVTier
from services.engine.kv_transfer import KVBlock, KVLayout, dtype_name, export_blocks
from services.engine.offload_plan import AttentionShards, WorkerLostError
from services.engine.remote_kv import HolderLostError, RemoteKV
from services.engine.request import FinishReason, Request, RequestOutput, Status, stop_reason
from services.engine.request_checks import check_cache_salt, check_priority, check_request
from services.engine.sampler import SampledToken, _has_penalty
from services.engine.sampling_params import SamplingParams
from services.engine.sched_output import SchedulerOutput
from services.engine.sched_policy import make_policy
from services.engine.scheduler import Scheduler
from services.engine.swap_space import SwapSpace
from services.engine.swapper import Swapper
from services.engine.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)


class LLMEngine:
    def __init__(
        self,
        model_dir: str | Path,
        config: EngineConfig | None = None,
        load_tokenizer_files: bool = True,
        seed: int | None = None,
    ) -> None:
        self.config = config = config or EngineConfig()
        model_dir = Path(model_dir)
        self.model_config = mcfg = ModelConfig.from_dir(model_dir)
        self.model_id = config.model_id or model_fingerprint(model_dir)
        self.dtype = config.resolve_dtype(mcfg)
        self.device = config.device
        self.tokenizer: Tokenizer | None = (
            load_tokenizer(model_dir) if load_tokenizer_files else None
        )
        self.max_model_len = config.max_model_len or mcfg.max_position_embeddings
        self.block_size = bs = config.block_size
        # The fused CUDA path: Triton kernels, CUDA graphs, async scheduling.
        self.fused = config.kernels == "auto" and triton_available(self.device)
        self.model = build_model(model_dir, mcfg, config, self.max_model_len, self.fused, seed)
        num_blocks = pool_blocks(self.model, config, self.max_model_len)
        # Offload: the blocks live on attention workers; none here.
        local = 0 if config.kv_offload else num_blocks
        self.kv_cache = KVCache.allocate(mcfg, local, bs, self.dtype, self.device)
        self._kv_layout = KVLayout(
            mcfg.num_layers, mcfg.num_kv_heads, mcfg.head_dim, dtype_name(self.dtype), bs,
            self.device,
        )  # fmt: skip
        self.pool = BlockPool(num_blocks, config.enable_prefix_caching)
        if config.kv_offload:
            self.pool.log_cached()  # the attention workers keep them beside the KV
        swap = None
        self.swapper: Swapper | None = None
        if config.preemption_mode != "recompute":
            host_blocks = config.swap_space_blocks or num_blocks
            swap = SwapSpace(config.preemption_mode, host_blocks, bs)
            self.swapper = Swapper(self.kv_cache, host_blocks, asynchronous=swap.group)
        self.scheduler = Scheduler(
            self.pool, bs, config.max_num_seqs, config.max_num_batched_tokens,
            make_policy(config.scheduling_policy), swap=swap,
        )  # fmt: skip
        if self.swapper is not None:
            self.scheduler.swap_done = self.swapper.done
        self.runner = build_runner(
            self.model, self.kv_cache, config, self.max_model_len, self.fused, seed
        )
        self.async_scheduling = self.fused and config.async_scheduling and not config.kv_offload
        # The step launched and not yet read: (so, its requests in so.seqs order, StepHandle).
        self._inflight: tuple[SchedulerOutput, list[Request], object] | None = None
        if self.fused:
            # What exists now (block pool, tokenizer, weights' wrappers) lives as long as the
            # engine: keep it out of the cyclic collector's full passes, which otherwise stall
            # the host for milliseconds every ~100 steps and leave the GPU idle (as vLLM does).
            gc.collect()
            gc.freeze()
        eos = set(mcfg.eos_token_ids)
        if self.tokenizer is not None:
            eos |= set(self.tokenizer.eos_token_ids)
        self.eos_token_ids = tuple(sorted(eos))
        self._requests: dict[str, Request] = {}
        self._detok: dict[str, IncrementalDetokenizer] = {}
        # Blocks of this pool lent to other engines' sequences (services.lender): held, not free.
        self.lent_blocks: Callable[[], Iterable[int]] | None = None

    def attach_remote_kv(self, remote: RemoteKV) -> None:
        """Let the engine borrow KV blocks from creditors when its own pool is short, and
        attend over them where they are (DistAttention). Call before adding requests."""
        self.scheduler.remote = remote
        self.runner.remote = remote

    def attach_kv_tier(self, tier: KVTier) -> None:
        """The store behind the host swap space (services/engine/kv_tier.py)."""
        self.scheduler.tier = tier

    def attach_shards(self, shards: AttentionShards) -> None:
        """Offload mode: the attention workers that hold this engine's KV (kv_offload)."""
        if not self.config.kv_offload:
            raise RuntimeError("attach_shards is for an engine with kv_offload set")
        self.runner.attach(shards)
        adopted = self.pool.adopt_cached(shards.adopted)
        if adopted:
            log.info("found %d cached blocks of a previous model worker", adopted)

    @property
    def remote_kv(self) -> RemoteKV | None:
        return self.scheduler.remote

    # -- requests -------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        *,
        output_token_ids: Sequence[int] = (),
        kv_blocks: Sequence[KVBlock | None] = (),
        export_kv: bool = False,
        arrival_time: float | None = None,
        priority: int = 0,
        cache_salt: str = "",
        stored_blocks: int = 0,
    ) -> None:
        """Queue a request.

        output_token_ids: tokens already generated elsewhere (a prefill engine's first token);
        they count toward max_tokens and are not reported again.
        kv_blocks: the KV of the leading blocks, by position, as another engine exported it;
        None marks a block that must be recomputed.
        export_kv: return the request's computed KV blocks when it finishes.
        priority: under scheduling_policy "priority", lower values are admitted first and
        preempted last; "fcfs" ignores it.
        cache_salt: the request's cache scope: its blocks are hashed under it, so it hits only
        blocks computed under the same salt (block_hash.root_hash).
        stored_blocks: leading full prompt blocks the KV tier holds (fetched after preemption).
        """
        prompt = [int(t) for t in prompt_token_ids]
        self._validate(request_id, prompt, params, len(output_token_ids))
        check_priority(priority)
        check_cache_salt(cache_salt)
        params = dataclasses.replace(params, eos_token_ids=self.eos_token_ids)
        req = Request(
            request_id=request_id,
            prompt_token_ids=prompt,
            params=params,
            arrival_time=arrival_time or time.monotonic(),
            block_size=self.block_size,
            model_id=self.model_id,
            cache_salt=cache_salt,
            output_token_ids=list(output_token_ids),
            imported_kv=list(kv_blocks),
            export_kv=export_kv,
            priority=priority,
            max_len=self.max_model_len,
            stored_blocks=min(max(0, int(stored_blocks)), len(prompt) // self.block_size),
        )
        self._requests[request_id] = req
        if self.tokenizer is not None:
            detok = IncrementalDetokenizer(
                self.tokenizer.backend, prompt, params.stop, params.skip_special_tokens
            )
            for t in output_token_ids:  # already reported by whoever generated them
                detok.push(t)
            self._detok[request_id] = detok
        self.scheduler.add(req)

    def _validate(
        self, request_id: str, prompt: list[int], params: SamplingParams, num_done: int
    ) -> None:
        if request_id in self._requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        check_request(
            prompt, params, num_done, vocab_size=self.model_config.vocab_size,
            max_model_len=self.max_model_len, block_size=self.block_size,
            pool_blocks=self.pool.num_blocks, can_borrow=self.remote_kv is not None,
        )  # fmt: skip

    def set_priority(self, request_id: str, priority: int) -> bool:
        """Change a live request's priority (scheduling_policy "priority"): a waiting request
        moves in the queue; a running one is preempted when a better one waits and blocks lack.
        False if the request is unknown or finished."""
        check_priority(priority)
        req = self._requests.get(request_id)
        if req is None or req.status == Status.FINISHED:
            return False
        self.scheduler.set_priority(req, priority)
        return True

    def abort(self, request_id: str) -> bool:
        """Stop a request wherever it is and free its blocks; False if it is unknown/finished."""
        req = self._requests.pop(request_id, None)
        self._detok.pop(request_id, None)
        if req is None:
            return False
        self.scheduler.finish(req, FinishReason.ABORT)
        return True

    @property
    def has_step_in_flight(self) -> bool:
        """A launched step whose tokens are not read yet (async scheduling)."""
        return self._inflight is not None

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0 or self._inflight is not None

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    @property
    def num_free_blocks(self) -> int:
        """KV blocks an allocation can take now (free, or cached and evictable)."""
        return self.pool.num_free

    @property
    def num_kv_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_preemptions(self) -> int:
        """Running requests preempted since the engine started."""
        return self.scheduler.num_preemptions

    # -- the step -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        self._take_back_reclaimed()
        if self.async_scheduling:
            return self._step_async()
        if self.config.kv_offload and not self._shards_ready():
            return self._failed_outputs()
        so = self._schedule()
        failed = self._failed_outputs()
        if so.is_empty:
            return failed
        reqs = self._requests_of(so)
        try:
            sampled = self.runner.run(so)
        except HolderLostError as e:
            # Its blocks are gone: the requests that had some start again from their tokens
            # (their local prefix mostly from the prefix cache); the others redo this step.
            self.scheduler.drop_remote(holder_id=e.holder_id)
            return failed
        except WorkerLostError as e:
            log.warning("%s", e)
            self._lose_kv()
            return failed
        outputs = failed
        now = time.monotonic()
        for req, seq, tok in zip(reqs, so.seqs, sampled, strict=True):
            self.scheduler.commit(req, seq)
            if tok is None:
                continue
            outputs.append(self._append_token(req, tok, now))
        return outputs

    def _schedule(self) -> SchedulerOutput:
        """Schedule a step and start the swaps it decided (before the step is launched: a
        synchronous swap-out reads blocks this step may write)."""
        so = self.scheduler.schedule()
        if self.swapper is not None:
            assert self.scheduler.swap is not None
            ops = self.scheduler.swap.take_ops()
            if ops:
                self.swapper.submit(ops)
            sched = self.scheduler
            if so.is_empty and self._inflight is None and (sched.swapping_in or sched.swapping_out):
                # Nothing runs until a swap lands: wait for one a little rather than spin.
                first = sched.swapping_in[0][1] if sched.swapping_in else sched.swapping_out[0][0]
                self.swapper.wait(first, 0.002)
        if so.is_empty and self._inflight is None and self.scheduler.fetching:
            self.scheduler.wait_fetch(0.002)  # nothing runs until a fetch lands
        return so

    def _shards_ready(self) -> bool:
        """Offload: every head range has a live attention worker (or one was found now); while
        not, requests wait."""
        shards = self.runner.shards
        if shards is None:
            raise RuntimeError("an offload engine steps only once its attention workers attach")
        if shards.ready:
            return True
        self._lose_kv()  # a worker went away between steps: what it held is gone too
        return shards.recover()

    def _lose_kv(self) -> None:
        """Offload: a head range of every block is gone. Every running request starts again
        from its tokens once a worker holds that range again, and no cached block can be
        trusted."""
        if self.scheduler.running:
            log.warning(
                "attention worker lost: recomputing %d requests", len(self.scheduler.running)
            )
        self.scheduler.preempt_all()
        self.pool.forget_cached()

    def _failed_outputs(self) -> list[RequestOutput]:
        """Requests the scheduler ended because they can never fit, as final outputs."""
        outs = []
        for req, why in self.scheduler.failed:
            self._requests.pop(req.request_id, None)
            self._detok.pop(req.request_id, None)
            outs.append(
                RequestOutput(
                    req.request_id,
                    [],
                    "",
                    True,
                    FinishReason.ABORT,
                    num_prompt_tokens=req.num_prompt_tokens,
                    num_output_tokens=req.num_output_tokens,
                    error=why,
                )
            )
        self.scheduler.failed = []
        return outs

    def _take_back_reclaimed(self) -> None:
        """Creditors that want their blocks back get them: those requests are preempted (to
        recompute; they borrow elsewhere or wait for local room)."""
        remote = self.remote_kv
        if remote is not None:
            ids = remote.reclaimed()
            if ids:
                self.scheduler.drop_remote(request_ids=set(ids))

    def _requests_of(self, so: SchedulerOutput) -> list[Request]:
        """The requests of so's seqs, in order, resolved right after scheduling (while their
        ids name them: an id is free for reuse once its request finishes)."""
        return [self._requests[s.request_id] for s in so.seqs]

    def _step_async(self) -> list[RequestOutput]:
        """Launch step n+1, then finish step n (whose outputs this returns)."""
        prev, self._inflight = self._inflight, None
        outputs: list[RequestOutput] = []
        if prev is not None and self._needs_values(prev[0], prev[1]):
            outputs += self._finish_step(*prev)
            prev = None
        so = self._schedule()
        outputs += self._failed_outputs()
        if not so.is_empty:
            reqs = self._requests_of(so)
            try:
                handle = self.runner.launch(so)
            except HolderLostError as e:
                self.scheduler.drop_remote(holder_id=e.holder_id)
                if prev is not None:
                    outputs += self._finish_step(*prev)
                return outputs
            for req, seq in zip(reqs, so.seqs, strict=True):
                self.scheduler.commit(req, seq)
                if seq.samples:
                    req.num_pending_tokens += 1
            self._inflight = (so, reqs, handle)
        if prev is not None:
            outputs += self._finish_step(*prev)
        return outputs

    @staticmethod
    def _needs_values(so: SchedulerOutput, reqs: list[Request]) -> bool:
        """The next step's sampling reads the tokens of this one (penalties count them)."""
        return any(s.samples and _has_penalty(r.params) for s, r in zip(so.seqs, reqs, strict=True))

    def _finish_step(self, so: SchedulerOutput, reqs: list[Request], handle) -> list[RequestOutput]:
        sampled = handle.result()
        outputs = []
        now = time.monotonic()
        for req, tok in zip(reqs, sampled, strict=True):
            if tok is None:
                continue
            req.num_pending_tokens -= 1
            if req.status == Status.FINISHED:  # aborted, or ended while this step ran
                continue
            outputs.append(self._append_token(req, tok, now))
        return outputs

    def _append_token(self, req: Request, tok: SampledToken, now: float) -> RequestOutput:
        req.output_token_ids.append(tok.token_id)
        hashed = len(req.block_hashes)
        req.update_hashes()
        if len(req.block_hashes) > hashed and req.status == Status.RUNNING:
            self.scheduler.cache_hashed(req, hashed)
        if req.first_token_time is None:
            req.first_token_time = now
        text, stopped = "", False
        detok = self._detok.get(req.request_id)
        if detok is not None:
            step = detok.push(tok.token_id)
            text, stopped = step.text_delta, step.stopped
        reason = stop_reason(req, tok.token_id, stopped)
        kv_blocks = None
        if reason is not None:
            if detok is not None and not stopped:
                text += detok.finish()
            if req.export_kv:
                kv_blocks = self.export_kv(req)
            self.scheduler.finish(req, reason)
            self._requests.pop(req.request_id, None)
            self._detok.pop(req.request_id, None)
        return RequestOutput(
            request_id=req.request_id,
            new_token_ids=[tok.token_id],
            new_text=text,
            finished=reason is not None,
            finish_reason=reason,
            logprobs=[tok] if req.params.logprobs is not None else [],
            num_prompt_tokens=req.num_prompt_tokens,
            num_output_tokens=req.num_output_tokens,
            num_cached_tokens=req.num_cached_tokens,
            kv_blocks=kv_blocks,
            queue_time_s=(req.scheduled_time or now) - req.arrival_time,
        )

    def export_kv(self, req: Request) -> list[KVBlock]:
        return export_blocks(req, self.kv_cache, self.block_size, self.model_id)

    # -- what the services ask ------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.model_config.vocab_size

    def prefix_cache_hits(self, block_hashes: Sequence[BlockHash]) -> int:
        """How many of these blocks, from the first on, the prefix cache holds now. Changes
        nothing, so a later eviction can make the answer stale; call it on the engine's thread."""
        return len(self.pool.lookup(block_hashes))

    def kv_block_layout(self) -> KVLayout:
        """The layout a KV block must have to be imported (add_request's kv_blocks)."""
        return self._kv_layout

    def check_integrity(self) -> PoolUsage:
        """Pool invariants, plus: blocks in use are exactly those held by live requests (and
        lent), and the runner's copy of every running request matches the scheduler's."""
        return check_engine(self)

    def run_until_done(self) -> Iterator[RequestOutput]:
        while self.has_unfinished():
            yield from self.step()

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams],
        **kwargs,
    ) -> list[Completion]:
        """Run prompts to completion together; results in prompt order."""
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        base = f"gen-{time.monotonic_ns()}"
        done = {}
        for i, (p, sp) in enumerate(zip(prompts, plist, strict=True)):
            rid = f"{base}-{i}"
            self.add_request(rid, p, sp, **kwargs)
            done[rid] = Completion(rid, list(p))
        for out in self.run_until_done():
            done[out.request_id].add(out)
        return list(done.values())

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise InvalidRequestError("this engine was loaded without a tokenizer")
        return self.tokenizer.encode(text)

    def request_status(self, request_id: str) -> Status | None:
        req = self._requests.get(request_id)
        return req.status if req else None
