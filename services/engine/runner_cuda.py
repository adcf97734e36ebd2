"""The model runner on a CUDA device: one host-to-device copy per step, decode steps replayed
as CUDA graphs, sampling on the GPU, and results read back without stalling the next step.

A step's integer inputs (token ids, positions, cache slots, decode context lengths and block
tables, logits rows) are packed into one pinned buffer and cross in one copy; two such buffers
alternate, so the CPU fills step n+1's while step n's may still be on its way.

Async scheduling: `launch` returns a StepHandle at once; the sampled ids reach the host by an
asynchronous copy and `StepHandle.result` waits for them (and appends them to the requests'
states). Step n+1 may be launched before that: a token that step n sampled and the host has not
seen yet is named in the input ids as -(1 + its row in step n), and the device takes it from the
previous step's token buffer.

CUDA graphs: pure-decode steps of up to max_graph_batch_size sequences are padded to the next
captured size and replayed; a padding row has slot -1 (writes nothing) and context length 0
(attends to nothing). The graph covers the whole forward pass and the greedy argmax; steps with
other sampling run the sampler on the graph's logits.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np
import torch

from services.engine.attention import AttentionMetadata, PrefillSeq
from services.engine.dist_attention import placements, plan_host, plan_step
from services.engine.dist_graphs import DistGraphs, HolderRows, pool_inputs
from services.engine.kv_cache import KVCache, slot_mapping
from services.engine.model import LlamaModel
from services.engine.prefill_attention_cuda import PrefillPlan, fill_plan, plan_space
from services.engine.runner_state import RequestState, RequestStates
from services.engine.sampler import SampledToken, Sampler
from services.engine.sampling_params import SamplingParams
from services.engine.sched_output import ScheduledSeq, SchedulerOutput


@dataclass
class StepHandle:
    """One launched step; result() waits for its sampled tokens and appends them to the
    sampling requests' states (once: a later call returns the same list)."""

    host_tokens: torch.Tensor  # pinned int64 [S], filled by an async copy
    event: torch.cuda.Event  # recorded after that copy
    samples: list[bool]  # per scheduled seq
    states: list[RequestState]  # per sampling row (a request dropped since then: harmless)
    params: list[SamplingParams]  # per sampling row
    want_lp: list[int]  # sampling rows that want logprobs
    raw_lp: torch.Tensor | None  # [len(want_lp), V] on the device
    _result: list[SampledToken | None] | None = None

    def result(self) -> list[SampledToken | None]:
        if self._result is None:
            self.event.synchronize()
            ids = self.host_tokens.tolist()
            picked = [t for t, s in zip(ids, self.samples, strict=True) if s]
            for st, t in zip(self.states, picked, strict=True):
                st.output_token_ids.append(t)
                st.num_pending -= 1
            toks = iter(Sampler.package(picked, self.params, self.want_lp, self.raw_lp))
            self._result = [next(toks) if s else None for s in self.samples]
        return self._result


def graph_batch_sizes(limit: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 64, every 16 up to 256, every 32 beyond, up to limit."""
    sizes = [s for s in (1, 2, 4) if s < limit]
    s = 8
    while s < limit:
        sizes.append(s)
        s += 8 if s < 64 else 16 if s < 256 else 32
    return [*sizes, limit] if limit > 0 else []


class _Inputs:
    """The packed int32 step inputs: a pinned host buffer and its device twin, with fixed
    offsets so that CUDA graphs can hold views of the device side."""

    def __init__(self, max_tokens: int, max_seqs: int, max_blocks: int, device: str) -> None:
        self.max_blocks = max_blocks
        t, s = max_tokens, max_seqs
        self.off = {
            "ids": 0, "pos": t, "slots": 2 * t, "lens": 3 * t, "rows": 3 * t + s,
            "sidx": 3 * t + 2 * s, "plan": 3 * t + 3 * s,
            "table": 3 * t + 3 * s + plan_space(t, s),
        }  # fmt: skip
        size = self.off["table"] + s * max_blocks
        self.host = [torch.zeros(size, dtype=torch.int32).pin_memory() for _ in range(2)]
        self.np = [h.numpy() for h in self.host]
        self.dev = torch.zeros(size, dtype=torch.int32, device=device)
        self.parity = 0
        self.sizes = (t, s)

    def view(self, name: str, n: int) -> torch.Tensor:
        o = self.off[name]
        return self.dev[o : o + n]

    def table(self, rows: int) -> torch.Tensor:
        o = self.off["table"]
        return self.dev[o : o + rows * self.max_blocks].view(rows, self.max_blocks)

    def host_np(self, name: str, n: int) -> np.ndarray:
        o = self.off[name]
        return self.np[self.parity][o : o + n]

    def host_table(self) -> np.ndarray:
        o = self.off["table"]
        return self.np[self.parity][o:].reshape(-1, self.max_blocks)

    def upload(self, table_rows: int) -> None:
        n = self.off["table"] + table_rows * self.max_blocks
        self.dev[:n].copy_(self.host[self.parity][:n], non_blocking=True)
        self.parity ^= 1


class CudaModelRunner:
    def __init__(
        self,
        model: LlamaModel,
        kv_cache: KVCache,
        sampler: Sampler,
        device: str,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        max_graph_batch_size: int,
        use_cuda_graphs: bool,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.sampler = sampler
        self.device = device
        self.bs = kv_cache.block_size
        self.scale = model.cfg.head_dim**-0.5
        self.graph_sizes = graph_batch_sizes(min(max_graph_batch_size, max_num_seqs))
        max_seqs = max(max_num_seqs, *self.graph_sizes, 1)
        max_tokens = max(max_num_batched_tokens, max_seqs)
        self.inputs = _Inputs(max_tokens, max_seqs, -(-max_model_len // self.bs), device)
        # Sampled ids of the last step, by scheduled-seq index; the next step reads its pending
        # tokens here. Host copies alternate like the inputs.
        self.tokens = torch.zeros(max_seqs, dtype=torch.long, device=device)
        self._host_tokens = [torch.zeros(max_seqs, dtype=torch.long).pin_memory() for _ in range(2)]
        self._tok_parity = 0
        self._rows: dict[str, int] = {}  # request id -> its row in `tokens` (last step)
        self.requests = RequestStates()
        self.remote = None  # a RemoteKV once the engine borrows memory (DistAttention)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None
        self._dist_graphs = None  # DistGraphs, made at the first split decode step
        self.dist_graph_steps = 0  # split decode steps run as graphs
        self.use_cuda_graphs = use_cuda_graphs
        if use_cuda_graphs and self.graph_sizes:
            self.capture()

    # -- one step -----------------------------------------------------------------------------

    def run(self, so: SchedulerOutput) -> list[SampledToken | None]:
        return self.launch(so).result()

    def launch(self, so: SchedulerOutput) -> StepHandle:
        self.requests.update(so)
        for block_id, kv in so.kv_loads:
            self.kv_cache.write_block(block_id, kv.to(self.kv_cache.data.device))
        seqs = so.seqs
        sampling = [i for i, s in enumerate(seqs) if s.samples]
        states = [self.requests[seqs[i].request_id] for i in sampling]
        rows = [st.sampling_row() for st in states]
        plain = Sampler.is_plain_greedy(rows)
        remote = self._has_remote(so)
        dist_logits = self._dist_replay(so) if remote else None
        graph_bs = 0 if remote else self._graph_size(so)
        if dist_logits is not None:  # [padded batch, V], a row per sequence
            logits = dist_logits
            if plain:
                self.tokens[: len(logits)] = logits.argmax(dim=-1)
            else:
                logits = logits[: len(seqs)][_index(sampling, self.device)]
        elif graph_bs:
            logits = self._replay(so, graph_bs)  # [graph_bs, V]; argmax already in self.tokens
            if not plain:
                logits = logits[: len(seqs)][_index(sampling, self.device)]
        else:
            ids, pos, meta, logits_rows = self.prepare(so, sampling)
            logits = self.model.forward(ids, pos, meta, self.kv_cache, logits_rows)  # [M, V]
            if plain:
                sidx = self.inputs.view("sidx", len(sampling)).long()
                self.tokens.index_copy_(0, sidx, logits.argmax(dim=-1))
        want_lp: list[int] = []
        raw_lp = None
        if not plain:
            toks, want_lp, raw_lp = self.sampler.sample_tokens(logits, rows)
            self.tokens.index_copy_(0, _index(sampling, self.device), toks)
        self._rows = {seqs[i].request_id: i for i in sampling}
        for st in states:  # their new token is in flight until the handle's result is read
            st.num_pending += 1

        host = self._host_tokens[self._tok_parity][: len(seqs)]
        self._tok_parity ^= 1
        host.copy_(self.tokens[: len(seqs)], non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return StepHandle(
            host, event, [s.samples for s in seqs], states, [r.params for r in rows], want_lp,
            raw_lp,
        )  # fmt: skip

    def prepare(
        self, so: SchedulerOutput, sampling: list[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        """Device tensors of one eager step: (input ids, positions, metadata, logits rows), for
        requests already in self.requests (launch() first applies the step's news there)."""
        seqs = so.seqs
        if sampling is None:
            sampling = [i for i, s in enumerate(seqs) if s.samples]
        inp = self.inputs
        n_tok = so.num_tokens
        nd = len(so.decodes)
        ids = inp.host_np("ids", n_tok)
        pos = inp.host_np("pos", n_tok)
        slots = inp.host_np("slots", n_tok)
        if self._has_remote(so):
            return self._prepare_dist(so, sampling, ids, pos, slots)
        self._fill_decodes(so.decodes, ids, pos, slots, nd)
        t = nd
        starts = []
        for s in so.prefills:
            st = self.requests[s.request_id]
            self._fill_tokens(s, st, ids[t : t + s.num_new])
            pos[t : t + s.num_new] = np.arange(s.start, s.end)
            slots[t : t + s.num_new] = slot_mapping(st.block_ids, s.start, s.end, self.bs)
            starts.append(t)
            t += s.num_new
        ends = np.cumsum([s.num_new for s in seqs])
        inp.host_np("rows", len(sampling))[:] = ends[sampling] - 1 if sampling else []
        inp.host_np("sidx", len(sampling))[:] = sampling
        plan = self._plan_prefills(so.prefills, starts, nd) if so.prefills else None
        inp.upload(nd + len(so.prefills) if plan else nd)

        prefills = []
        for i, (start, s) in enumerate(zip(starts, so.prefills, strict=True)):
            table = None
            if s.start > 0:
                if plan is not None:
                    table = plan.table[i, : -(-s.end // self.bs)]
                else:
                    blocks = self.requests[s.request_id].block_ids[: -(-s.end // self.bs)]
                    table = torch.tensor(blocks, dtype=torch.long).to(self.device)
            prefills.append(PrefillSeq(start, s.num_new, s.end, table))
        meta = AttentionMetadata(
            num_decode=nd,
            slot_mapping=inp.view("slots", n_tok),
            decode_block_table=inp.table(nd) if nd else None,
            decode_mask=None,
            prefills=tuple(prefills),
            scale=self.scale,
            block_size=self.bs,
            decode_context_lens=inp.view("lens", nd) if nd else None,
            prefill_plan=plan,
        )
        ids_dev = self._resolve(inp.view("ids", n_tok))
        return ids_dev, inp.view("pos", n_tok), meta, inp.view("rows", len(sampling)).long()

    def _plan_prefills(
        self, chunks: list[ScheduledSeq], starts: list[int], nd: int
    ) -> PrefillPlan | None:
        """The step's prefill chunks for the one-launch kernel (the fused path), in the pinned
        inputs: tiles and chunk rows in "plan", block tables in the table rows after decode's."""
        if not self.model.fused:
            return None
        inp = self.inputs
        rows = [(st, s.num_new, s.end) for st, s in zip(starts, chunks, strict=True)]
        seqs_at, seqs_end = fill_plan(rows, inp.host_np("plan", plan_space(*inp.sizes)))
        table = inp.host_table()[nd : nd + len(chunks)]
        for r, s in zip(table, chunks, strict=True):
            blocks = self.requests[s.request_id].block_ids[: -(-s.end // self.bs)]
            r[: len(blocks)] = blocks
        dev = inp.view("plan", seqs_end)
        return PrefillPlan(
            dev[:seqs_at].view(-1, 2),
            dev[seqs_at:seqs_end].view(-1, 3),
            inp.table(nd + len(chunks))[nd:],
        )

    def _has_remote(self, so: SchedulerOutput) -> bool:
        return self.remote is not None and any(self.requests[s.request_id].remote for s in so.seqs)

    def _dist_replay(self, so: SchedulerOutput) -> torch.Tensor | None:
        """A decode step with remote KV as CUDA graphs (dist_graphs.py): logits of the padded
        batch, or None where it can't (prefill rows, holders without shared buffers): then
        the step runs op by op."""
        from services.engine.fused_ops import HAS_TRITON

        if so.prefills or not (self.use_cuda_graphs and self.model.fused and HAS_TRITON):
            return None
        if not hasattr(self.remote, "send_ready"):
            return None
        seqs = placements(so, self.requests)
        plan = plan_host(seqs, self.bs)
        in_place = {}
        if getattr(self.remote, "in_place", None) is not None:
            for h in plan.by_holder:
                pool = self.remote.in_place(h)
                if pool is not None:
                    in_place[h] = pool
        pool_rows = [pool_inputs(seqs, h, self.bs, self.inputs.max_blocks) for h in in_place]
        if any(p is None for p in pool_rows):
            return None
        holders = [h for h in plan.by_holder if h not in in_place]
        if self._dist_graphs is None:
            self._dist_graphs = DistGraphs(self.model, self.kv_cache, self._resolve,
                                           self.graph_sizes, self.inputs.max_blocks)  # fmt: skip
        n = len(so.decodes)
        gs = self._dist_graphs.get(self.remote, holders, n, in_place)
        if gs is None:
            return None
        inp = self.inputs
        ids = inp.host_np("ids", n)
        pos = np.empty(n, dtype=np.int64)
        lens = np.empty(n, dtype=np.int64)
        width = max(len(seg[2]) for seg in plan.local_segments)
        table = np.zeros((n, max(width, 1)), dtype=np.int64)
        for r, s in enumerate(so.decodes):
            self._fill_tokens(s, self.requests[s.request_id], ids[r : r + 1])
            pos[r] = s.start
            seen = plan.local_segments[r][2]
            table[r, : len(seen)] = seen
            lens[r] = min(s.start + 1, len(seen) * self.bs)
        inp.upload(0)
        parts = []
        for h in holders:
            slices, qrows, wrows = plan.by_holder[h]
            self.remote.begin_step(h, slices)
            parts.append(HolderRows(h, np.asarray(qrows), np.asarray(wrows)))
        gs.fill(inp.view("ids", n), pos, plan.slots, table, lens, parts, pool_rows)
        for i in range(len(self.model.w.layers)):
            gs.replay(i)
            pending = [
                self.remote.send_ready(p.holder_id, i, len(p.q_rows), len(p.kv_rows)) for p in parts
            ]
            gs.replay_after(i)  # the local (and in-place) partials, while holders attend
            for p in pending:
                p.result()
        gs.replay(len(self.model.w.layers))
        self.dist_graph_steps += 1
        return gs.logits

    def _prepare_dist(self, so: SchedulerOutput, sampling: list[int], ids, pos, slots):
        """An eager step with remote KV: DistAttention for every sequence (no CUDA graph: the
        holders' answers arrive over the network)."""
        inp = self.inputs
        t = 0
        for s in so.seqs:
            self._fill_tokens(s, self.requests[s.request_id], ids[t : t + s.num_new])
            pos[t : t + s.num_new] = np.arange(s.start, s.end)
            t += s.num_new
        local_slots, dist = plan_step(
            placements(so, self.requests), self.remote, self.bs, self.scale, self.device
        )
        slots[:t] = local_slots
        ends = np.cumsum([s.num_new for s in so.seqs])
        inp.host_np("rows", len(sampling))[:] = ends[sampling] - 1 if sampling else []
        inp.host_np("sidx", len(sampling))[:] = sampling
        inp.upload(0)
        meta = AttentionMetadata(
            num_decode=len(so.decodes), slot_mapping=inp.view("slots", t), decode_block_table=None,
            decode_mask=None, prefills=(), scale=self.scale, block_size=self.bs, dist=dist,
        )  # fmt: skip
        ids_dev = self._resolve(inp.view("ids", t))
        return ids_dev, inp.view("pos", t), meta, inp.view("rows", len(sampling)).long()

    def _fill_tokens(self, s: ScheduledSeq, st: RequestState, out: np.ndarray) -> None:
        """Input ids of s's tokens; a pending token becomes -(1 + its row in the last step)."""
        known = min(s.end, st.num_tokens)
        if s.start < known:
            out[: known - s.start] = st.tokens(s.start, known)
        if s.end > known:  # at most one: the token the last step sampled
            out[known - s.start] = -1 - self._rows[s.request_id]

    def _fill_decodes(
        self,
        decodes: list[ScheduledSeq],
        ids: np.ndarray,
        pos: np.ndarray,
        slots: np.ndarray,
        nd: int,
    ) -> None:
        if not decodes:
            return
        bs = self.bs
        lens = self.inputs.host_np("lens", nd)
        table = self.inputs.host_table()
        rows = self._rows
        states = self.requests
        for r, s in enumerate(decodes):
            st = states[s.request_id]
            p = s.start
            n_prompt = len(st.prompt_token_ids)
            if p < n_prompt:
                ids[r] = st.prompt_token_ids[p]
            elif p - n_prompt < len(st.output_token_ids):
                ids[r] = st.output_token_ids[p - n_prompt]
            else:
                ids[r] = -1 - rows[s.request_id]
            blocks = st.block_ids
            pos[r] = p
            slots[r] = blocks[p // bs] * bs + p % bs
            lens[r] = p + 1
            nblk = p // bs + 1
            table[r, :nblk] = blocks[:nblk]

    def _resolve(self, ids: torch.Tensor) -> torch.Tensor:
        """Input ids with pending tokens taken from the last step's token buffer."""
        prev = self.tokens[(-1 - ids).clamp_(min=0)]
        return torch.where(ids >= 0, ids.long(), prev)

    # -- CUDA graphs ----------------------------------------------------------------------------

    def _graph_size(self, so: SchedulerOutput) -> int:
        if not self._graphs or so.prefills:
            return 0
        i = bisect.bisect_left(self.graph_sizes, len(so.decodes))
        return self.graph_sizes[i] if i < len(self.graph_sizes) else 0

    def _replay(self, so: SchedulerOutput, graph_bs: int) -> torch.Tensor:
        inp = self.inputs
        nd = len(so.decodes)
        ids = inp.host_np("ids", graph_bs)
        pos = inp.host_np("pos", graph_bs)
        slots = inp.host_np("slots", graph_bs)
        self._fill_decodes(so.decodes, ids, pos, slots, nd)
        ids[nd:] = 0
        pos[nd:] = 0
        slots[nd:] = -1
        inp.host_np("lens", graph_bs)[nd:] = 0
        inp.upload(graph_bs)
        graph, logits = self._graphs[graph_bs]
        graph.replay()
        return logits

    def _decode_body(self, batch: int) -> torch.Tensor:
        inp = self.inputs
        meta = AttentionMetadata(
            num_decode=batch,
            slot_mapping=inp.view("slots", batch),
            decode_block_table=inp.table(batch),
            decode_mask=None,
            prefills=(),
            scale=self.scale,
            block_size=self.bs,
            decode_context_lens=inp.view("lens", batch),
        )
        ids = self._resolve(inp.view("ids", batch))
        logits = self.model.forward(ids, inp.view("pos", batch), meta, self.kv_cache, None)
        self.tokens[:batch] = logits.argmax(dim=-1)
        return logits

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture one graph per batch size, largest first, sharing one memory pool."""
        inp = self.inputs
        # Padding inputs for capture: they write nothing and attend to nothing.
        inp.dev[inp.off["slots"] : inp.off["lens"]].fill_(-1)
        inp.dev[inp.off["ids"] : inp.off["slots"]].zero_()
        inp.view("lens", max(self.graph_sizes)).zero_()
        self._pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for batch in sorted(self.graph_sizes, reverse=True):
                self._decode_body(batch)  # warm up: Triton compiles, cuBLAS picks kernels
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._pool, stream=stream):
                    logits = self._decode_body(batch)
                self._graphs[batch] = (graph, logits)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()


def _index(idx: list[int], device: str) -> torch.Tensor:
    return torch.tensor(idx, dtype=torch.long).to(device, non_blocking=True)
