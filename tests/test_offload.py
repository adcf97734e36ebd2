"""Attention offload end to end: a model worker with no KV of its own, attention workers
holding its KV heads (real gRPC services found through Redis), against the colocated engine:
the same greedy tokens, with concurrent sequences, chunked prefill, prefix-cache hits and
preemption; the wire carries Lamina's (2 + 2/G) e d bytes per token and layer."""

from __future__ import annotations

import signal

import pytest
import torch

from services.engine.offload_plan import PrefillChunk, StepLayout, head_ranges, split_step
from tests.dist_helpers import GREEDY, drive, traces
from tests.engine_helpers import make_engine, random_prompts
from tests.offload_helpers import BS, model_worker, worker_process

MODES = {"plain": (False, False), "q_first": (False, True), "pingpong": (True, False),
         "both": (True, True)}  # fmt: skip


def same_tokens(got, want, tol: float = 1e-3) -> None:
    """Equal tokens; log-probabilities equal within tol (q first merges in float32)."""
    assert [[t for t, _ in s] for s in got] == [[t for t, _ in s] for s in want]
    for g, w in zip(got, want, strict=True):
        assert max((abs(a - b) for (_, a), (_, b) in zip(g, w, strict=True)), default=0) < tol


def test_head_ranges_cover_every_kv_head_once():
    assert head_ranges(3, 2) == [(0, 2), (2, 3)]
    assert head_ranges(8, 3) == [(0, 3), (3, 6), (6, 8)]
    assert head_ranges(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    with pytest.raises(ValueError, match="each needs one or more"):
        head_ranges(2, 3)


def test_two_batch_split_keeps_rows_and_chunks_in_order():
    import numpy as np

    lay = StepLayout(
        3,
        np.arange(7),
        np.zeros((3, 2), dtype=np.int64),
        np.array([4, 5, 6]),
        (PrefillChunk(3, 4, 4, None),),
    )
    a, b = split_step(lay, [0, 1, 2, 6], two=True)
    assert (a.row_start, a.row_end, b.row_start, b.row_end) == (0, 1, 1, 7)
    assert a.logits_rows == [0] and b.logits_rows == [0, 1, 5]
    assert b.layout.prefills[0].query_start == 2 and b.layout.num_decode == 2
    assert [m.tag for m in split_step(lay, [0], two=False)] == [0]


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("workers", [1, 2])
def test_offload_is_token_exact_with_chunks_prefix_hits_and_preemption(
    mode, workers, tiny_model_dir, cluster, offload_workers, reference
):
    """Eight sequences at once over a pool too small for all (preemption), in chunks of 48
    tokens, sharing a 4-block prefix (cached after the first), KV heads over 1 or 2 workers."""
    started = [offload_workers(num_blocks=64) for _ in range(workers)]
    pingpong, q_first = MODES[mode]
    shared = random_prompts(1, 256, 64, 64, seed=5)[0]
    prompts = [shared + p for p in random_prompts(8, 256, 40, 160, seed=6)]
    engine, w = model_worker(
        tiny_model_dir, cluster, num_workers=workers, num_kv_blocks=40,
        max_num_batched_tokens=48, offload_pingpong=pingpong, offload_q_first=q_first,
    )  # fmt: skip
    try:
        first = engine.generate(prompts[:1], GREEDY)[0]
        rest = engine.generate(prompts[1:], GREEDY)
        same_tokens(traces([first, *rest]), reference(prompts))
        assert any(c.num_cached_tokens >= 64 for c in rest)  # the shared prefix was a hit
        assert engine.num_preemptions > 0  # 40 blocks can't hold eight ~13-block sequences
        assert all(s.layer_batches > 0 for s in started)
        engine.check_integrity()
        c = engine.runner.counters
        cfg = engine.model_config
        g = cfg.num_heads // cfg.num_kv_heads
        d = cfg.num_heads * cfg.head_dim
        assert c.bytes_per_token_layer == pytest.approx((2 + 2 / g) * 4 * d)  # float32
    finally:
        w.close()


@pytest.mark.parametrize("shared", [True, False], ids=["shm", "bytes"])
def test_smollm2_offload_is_token_exact(shared, smollm2_dir, cluster, offload_workers):
    for _ in range(2):
        offload_workers(num_blocks=48, model_dir=smollm2_dir, name="smol")
    prompts = random_prompts(3, 4096, 20, 90, seed=9)
    want = traces(make_engine(smollm2_dir, block_size=BS).generate(prompts, GREEDY))
    engine, w = model_worker(
        smollm2_dir, cluster, name="smol", num_workers=2, num_kv_blocks=32, shared=shared,
        max_num_batched_tokens=64,
    )  # fmt: skip
    try:
        same_tokens(traces(engine.generate(prompts, GREEDY)), want)
        assert all((s.ipc is not None) == shared for s in (x.stream for x in w._workers))
    finally:
        w.close()


def test_killed_attention_worker_is_replaced_and_recomputed_token_exact(
    tiny_model_dir, cluster, reference
):
    """The real fault: the worker process holding the KV is SIGKILLed mid-generation; the
    model worker waits for a replacement, then recomputes every sequence from its tokens."""
    proc = worker_process(tiny_model_dir, cluster, 64)
    spare = None
    prompts = random_prompts(3, 256, 30, 120, seed=21)
    try:
        engine, w = model_worker(tiny_model_dir, cluster, num_kv_blocks=48,
                                 max_num_batched_tokens=64)  # fmt: skip
        killed = False

        def kill(outs):
            nonlocal killed, spare
            if not killed and sum(map(len, outs.values())) >= 6:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=30)
                killed = True
                spare = worker_process(tiny_model_dir, cluster, 64)

        rids = ["a", "b", "c"]
        reqs = {r: (p, GREEDY) for r, p in zip(rids, prompts, strict=True)}
        outs, errors = drive(engine, reqs, kill)
        assert not errors and killed
        same_tokens([outs[r] for r in rids], reference(prompts))
        assert engine.num_preemptions >= 3
        assert w.placement()[0][0] == spare.address
        engine.check_integrity()
        w.close()
    finally:
        for p in (proc, spare):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(timeout=30)


@pytest.mark.gpu
def test_gpu_offload_over_cuda_ipc_is_token_exact(tiny_model_dir, cluster):
    """A worker process on the GPU, its layer batches through CUDA IPC buffers."""
    proc = worker_process(tiny_model_dir, cluster, 64, device="cuda:0")
    try:
        prompts = random_prompts(4, 256, 20, 120, seed=2)
        ref = make_engine(tiny_model_dir, block_size=BS, device="cuda:0", dtype="float32")
        want = traces(ref.generate(prompts, GREEDY))
        for pingpong, q_first in MODES.values():
            engine, w = model_worker(
                tiny_model_dir, cluster, num_kv_blocks=48, device="cuda:0", dtype="float32",
                offload_pingpong=pingpong, offload_q_first=q_first,
            )  # fmt: skip
            same_tokens(traces(engine.generate(prompts, GREEDY)), want)
            assert w._workers[0].stream.ipc is not None
            w.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        torch.cuda.empty_cache()
