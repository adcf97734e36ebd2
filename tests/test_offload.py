"""Attention offload end to end: a model worker with no KV of its own, attention workers
holding its KV heads (real gRPC services found through Redis), against the colocated engine:
the same greedy tokens, with concurrent sequences, chunked prefill, prefix-cache hits and
preemption; the wire carries Lamina's (2 + 2/G) e d bytes per token and layer."""

from __future__ import annotations

import signal
import time

import pytest
import torch

from services.engine.offload_plan import PrefillChunk, StepLayout, head_ranges, split_step
from services.engine.sampling_params import SamplingParams
from tests.dist_helpers import GREEDY, drive, same_tokens, traces
from tests.engine_helpers import make_engine, random_prompts
from tests.offload_helpers import BS, model_worker, worker_process

MODES = {"plain": (False, False), "q_first": (False, True), "pingpong": (True, False),
         "both": (True, True)}  # fmt: skip


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


@pytest.mark.parametrize("transport", ["link", "shm", "bytes"])
def test_smollm2_offload_is_token_exact(transport, smollm2_dir, cluster, offload_workers):
    """Over each way layer batches travel: shared memory with a local socket for control
    (the same-host default), shared memory with gRPC control, bytes in gRPC messages."""
    shared, local = transport != "bytes", transport == "link"
    for _ in range(2):
        offload_workers(num_blocks=48, model_dir=smollm2_dir, name="smol")
    prompts = random_prompts(3, 4096, 20, 90, seed=9)
    want = traces(make_engine(smollm2_dir, block_size=BS).generate(prompts, GREEDY))
    engine, w = model_worker(
        smollm2_dir, cluster, name="smol", num_workers=2, num_kv_blocks=32, shared=shared,
        local=local, max_num_batched_tokens=64,
    )  # fmt: skip
    try:
        same_tokens(traces(engine.generate(prompts, GREEDY)), want)
        assert all((x.stream.ipc is not None) == shared for x in w._workers)
        assert all((x.link is not None) == local for x in w._workers)
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
    # Room for every mode's region: a closed model worker's region is kept for a while, for
    # a successor to adopt.
    proc = worker_process(tiny_model_dir, cluster, 48 * len(MODES), device="cuda:0")
    try:
        prompts = random_prompts(4, 256, 20, 120, seed=2)
        ref = make_engine(tiny_model_dir, block_size=BS, device="cuda:0", dtype="float32")
        want = traces(ref.generate(prompts, GREEDY))
        for i, (pingpong, q_first) in enumerate(MODES.values()):
            # A model worker per mode, each of its own id (a new one is not the last's
            # successor).
            engine, w = model_worker(
                tiny_model_dir, cluster, num_kv_blocks=48, device="cuda:0", dtype="float32",
                offload_pingpong=pingpong, offload_q_first=q_first, worker_id=f"model-{i}",
            )  # fmt: skip
            same_tokens(traces(engine.generate(prompts, GREEDY)), want)
            assert w._workers[0].stream.ipc is not None
            w.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        torch.cuda.empty_cache()


def test_bad_requests_get_their_own_codes_and_harm_nothing(tiny_model_dir, offload_workers):
    import grpc
    import numpy as np

    from protos.splitserve.v1 import offload_pb2 as pb
    from protos.splitserve.v1 import offload_pb2_grpc as pb_grpc
    from rpc.channel import GRPC_OPTIONS
    from services.offload_server import layout_to_pb
    from services.wire import tensor_to_pb

    srv = offload_workers(num_blocks=8)
    cfg = srv.offload.cfg
    g, d = cfg.num_heads // cfg.num_kv_heads, cfg.head_dim

    def step(slots, lens=(3,), table=((0,),)):
        lay = StepLayout(len(lens), np.array(slots), np.array(table), np.array(lens), ())
        return layout_to_pb(0, lay)

    def layer(rows=1, heads=1, part=pb.OffloadLayer.ALL, layer_no=0):
        msg = pb.OffloadLayer(tag=0, layer=layer_no, part=part)
        if part != pb.OffloadLayer.KV:
            tensor_to_pb(torch.randn(rows, heads * g, d), msg.q)
        if part != pb.OffloadLayer.Q:
            tensor_to_pb(torch.randn(rows, heads, d), msg.k)
            tensor_to_pb(torch.randn(rows, heads, d), msg.v)
        return msg

    def attach(**kw):
        a = dict(worker_id="m", layout=srv.layout, kv_head_start=0, kv_head_end=1, num_blocks=4)
        return pb.Attach(**{**a, **kw})

    reqs = [
        pb.OffloadRequest(id=1, step=step([2])),  # before attach
        pb.OffloadRequest(id=2, attach=attach(layout="other")),
        pb.OffloadRequest(id=3, attach=attach(kv_head_end=cfg.num_kv_heads + 1)),
        pb.OffloadRequest(id=4, attach=attach(num_blocks=10_000)),  # over the memory
        pb.OffloadRequest(id=5, attach=attach()),
        pb.OffloadRequest(id=6, step=step([4 * BS])),  # a slot past the region
        pb.OffloadRequest(id=7, step=step([2], table=((9,),))),  # a block past the region
        pb.OffloadRequest(id=8, layer=layer()),  # no layout for tag 0 (the last one failed)
        pb.OffloadRequest(id=9, step=step([2])),
        pb.OffloadRequest(id=10, layer=layer(heads=2)),  # more heads than attached
        pb.OffloadRequest(id=11, layer=layer(layer_no=cfg.num_layers)),  # no such layer
        pb.OffloadRequest(id=12, layer=layer(part=pb.OffloadLayer.KV)),  # k, v before q
        pb.OffloadRequest(id=13, layer=layer()),  # fine, after all of the above
    ]
    with grpc.insecure_channel(srv.address, options=GRPC_OPTIONS) as ch:
        stub = pb_grpc.AttentionOffloadStub(ch)
        resps = {r.id: r for r in stub.Session(iter(reqs), timeout=60)}
    code = {i: grpc.StatusCode(next(c for c in grpc.StatusCode if c.value[0] == r.code))
            for i, r in resps.items()}  # fmt: skip
    assert code[1] == code[2] == grpc.StatusCode.FAILED_PRECONDITION
    assert code[3] == grpc.StatusCode.INVALID_ARGUMENT
    assert code[4] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert code[5] == code[9] == code[13] == grpc.StatusCode.OK
    assert code[6] == code[7] == code[8] == code[10] == code[11] == code[12]
    assert code[6] == grpc.StatusCode.INVALID_ARGUMENT
    assert tuple(resps[13].out.layout.shape) == (1, g, d)
    # The stream ended: its region is kept for a replacement to adopt, then freed.
    deadline = time.monotonic() + 20
    while srv.offload.sessions and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not srv.offload.sessions and list(srv.offload.orphans) == ["m"]
    srv.offload.keep_s = 0
    srv.offload.orphans["m"] = (0.0, srv.offload.orphans["m"][1])
    srv.offload._purge()
    assert srv.offload.used_bytes == 0


def test_kv_offload_command_shows_where_heads_live(redis_url, namespace):
    import json

    from typer.testing import CliRunner

    from services.offload_client import forget_placement, record_placement
    from splitserve.cli import app

    record_placement(redis_url, namespace, "model-a", [("h1:1", (0, 2)), ("h2:2", (2, 3))])
    res = CliRunner().invoke(app, ["kv", "offload", "--redis", redis_url, "--namespace",
                                   namespace, "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads(res.output) == {"model-a": {"0-2": "h1:1", "2-3": "h2:2"}}
    res = CliRunner().invoke(app, ["kv", "offload", "--redis", redis_url, "--namespace", namespace])
    assert res.exit_code == 0 and "model-a" in res.output and "h2:2" in res.output
    forget_placement(redis_url, namespace, "model-a")
    res = CliRunner().invoke(app, ["kv", "offload", "--redis", redis_url, "--namespace", namespace])
    assert "no offload model workers" in res.output
    res = CliRunner().invoke(app, ["kv", "offload", "--redis", "redis://127.0.0.1:1"])
    assert res.exit_code != 0 and "cannot read" in res.output


@pytest.mark.parametrize(
    ("model", "error"),
    [
        ({}, "mode offload needs an attention section"),
        ({"attention": {"replicas": 1}, "colocated": {"lend_fraction": 0.5}},
         "colocated.lend_fraction"),
        ({"attention": {"replicas": 1, "autoscaling": {"min_replicas": 1, "max_replicas": 2}}},
         "set fixed replicas"),
        ({"attention": {"replicas": 1}, "engine": {"num_kv_blocks": 64}}, "engine.num_kv_blocks"),
    ],
)  # fmt: skip
def test_offload_config_errors_name_the_field(model, error):
    from splitserve.app_config import ConfigError, parse_config

    with pytest.raises(ConfigError, match=error):
        parse_config({"models": [{"name": "m", "path": "tiny", "mode": "offload", **model}]})


def test_offload_plan_splits_worker_memory_among_model_workers(tiny_model_dir):
    from splitserve.app_config import parse_config
    from splitserve.deployment import plan_deployment

    cfg = parse_config({"models": [{
        "name": "m", "path": "tiny", "mode": "offload", "colocated": {"replicas": 2},
        "attention": {"replicas": 2, "num_kv_blocks": 100}, "engine": {"block_size": BS},
    }]})  # fmt: skip
    plan = plan_deployment(cfg, "redis://127.0.0.1:1", {"m": tiny_model_dir})
    model = next(r.config for r in plan.replicas if r.role == "colocated")
    attn = next(r.config for r in plan.replicas if r.role == "attention")
    assert attn.offload and model.offload_workers == 2 and model.engine.kv_offload
    # 100 blocks a worker, half each for two model workers, of 1 of the 2 KV heads.
    assert model.engine.num_kv_blocks == 100
    assert plan.router.models[0].mode == "colocated"
    cfg = parse_config({"models": [{"name": "m", "path": "tiny", "mode": "offload",
                                    "attention": {"replicas": 3}}]})  # fmt: skip
    with pytest.raises(ValueError, match=r"attention\.replicas: 3 attention workers for 2 KV"):
        plan_deployment(cfg, "redis://127.0.0.1:1", {"m": tiny_model_dir})


def test_the_offload_example_plans(smollm2_dir):
    from pathlib import Path

    from splitserve.app_config import load_config
    from splitserve.deployment import plan_deployment

    example = Path(__file__).resolve().parents[1] / "examples" / "offload.yaml"
    cfg = load_config(example)
    plan = plan_deployment(cfg, "redis://127.0.0.1:1", {cfg.models[0].name: smollm2_dir})
    roles = sorted(r.role for r in plan.replicas)
    assert roles == ["attention", "colocated"]
    model = next(r for r in plan.replicas if r.role == "colocated")
    assert model.spec.replicas == 2 and model.config.engine.num_kv_blocks > 100


_MODEL_WORKER = """
import sys
from kvstore.config import Membership
from services.engine.sampling_params import SamplingParams
from tests.offload_helpers import model_worker
model, url, ns, prompt = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
cluster = Membership(redis_url=url, namespace=ns)
engine, w = model_worker(model, cluster, num_kv_blocks=32, worker_id="model-a")
engine.add_request("r", [int(t) for t in prompt.split(",")],
                   SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
while engine.has_unfinished():
    for out in engine.step():
        for t in out.new_token_ids:
            print(t, flush=True)
"""


def test_killed_model_worker_is_replaced_and_goes_on_from_the_workers_kv(tiny_model_dir, cluster):
    """Model workers are stateless: one SIGKILLed mid-generation leaves its region on the
    attention worker; a replacement adopts it, finds the full blocks in its prefix cache and
    continues the request (resubmitted with the tokens so far) with the same tokens."""
    import subprocess
    import sys
    from pathlib import Path

    from services.engine.sampling_params import SamplingParams

    proc = worker_process(tiny_model_dir, cluster, 64)
    prompt = random_prompts(1, 256, 70, 70, seed=31)[0]
    ref = make_engine(tiny_model_dir, block_size=BS)
    want = ref.generate([prompt], GREEDY)[0].token_ids
    root = str(Path(__file__).resolve().parents[1])
    mw = subprocess.Popen(
        [sys.executable, "-c", _MODEL_WORKER, str(tiny_model_dir), cluster.redis_url,
         cluster.namespace, ",".join(map(str, prompt))],
        stdout=subprocess.PIPE, text=True, cwd=root,
    )  # fmt: skip
    try:
        got = [int(mw.stdout.readline()) for _ in range(12)]  # 70 + 12 tokens: 5 full blocks
        mw.send_signal(signal.SIGKILL)
        mw.wait(timeout=30)
        assert got == want[:12]
        engine, w = model_worker(tiny_model_dir, cluster, num_kv_blocks=32, worker_id="model-b")
        try:
            assert len(w.adopted) >= 4  # the full blocks the first one computed
            params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
            rest = engine.generate([prompt + got], params)[0]
            assert rest.token_ids == want[12:24]
            assert rest.num_cached_tokens >= 4 * BS  # found in place, not recomputed
            engine.check_integrity()
        finally:
            w.close()
    finally:
        for p in (mw, proc):
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)


@pytest.mark.parametrize("workers", [1, 2])
def test_prefill_hands_kv_to_the_attention_workers(
    workers, tiny_model_dir, cluster, offload_workers, reference
):
    """A prefill engine's exported KV, imported by an offload model worker: each attention
    worker gets its heads of the blocks, nothing is recomputed, and decoding goes on with the
    colocated engine's tokens."""
    for _ in range(workers):
        offload_workers(num_blocks=64)
    prompts = random_prompts(3, 256, 40, 100, seed=41)
    prefill = make_engine(tiny_model_dir, block_size=BS)
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, logprobs=0)
    firsts = prefill.generate(prompts, one, export_kv=True)
    engine, w = model_worker(tiny_model_dir, cluster, num_workers=workers, num_kv_blocks=40)
    try:
        rest_params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=0)
        for p, first, want in zip(prompts, firsts, reference(prompts), strict=True):
            [rest] = engine.generate(
                [p], rest_params, output_token_ids=first.token_ids, kv_blocks=first.kv_blocks
            )
            assert first.token_ids + rest.token_ids == [t for t, _ in want]
        # Only decode rows ran: each request's 23 tokens after the handed-off one.
        layers = engine.model_config.num_layers
        assert engine.runner.counters.token_layers == len(prompts) * 23 * layers
        engine.check_integrity()
    finally:
        w.close()
