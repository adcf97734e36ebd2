"""Scheduling paths must not change tokens: chunking, prefix hits, preemption, KV import."""

import pytest

from services.engine.block_hash import hash_blocks
from services.engine.kv_transfer import KVLayout
from services.engine.sampling_params import SamplingParams
from tests.engine_helpers import GREEDY, make_engine, random_prompts

SHORT = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def prompts(tiny_model_dir):
    return random_prompts(6, 2048, 20, 140, seed=11)


@pytest.fixture(scope="module")
def reference(tiny_model_dir, prompts):
    """Each prompt alone, unchunked, no prefix cache: the baseline every path must equal."""
    engine = make_engine(tiny_model_dir, max_num_batched_tokens=4096, enable_prefix_caching=False)
    return [engine.generate([p], SHORT)[0].token_ids for p in prompts]


@pytest.mark.parametrize("budget", [1, 7, 16, 33, 512])
def test_chunked_prefill_equals_unchunked(tiny_model_dir, prompts, reference, budget, checked):
    engine = checked(make_engine(tiny_model_dir, max_num_batched_tokens=budget))
    outs = engine.generate(prompts[:3] if budget == 1 else prompts, SHORT)
    assert [o.token_ids for o in outs] == reference[: len(outs)]


def test_prefix_cache_hit_equals_cold_run(tiny_model_dir, prompts, reference, checked):
    engine = checked(make_engine(tiny_model_dir))
    first = engine.generate([prompts[0]], SHORT)[0]
    assert first.num_cached_tokens == 0
    again = engine.generate([prompts[0]], SHORT)[0]
    # All full blocks of the prompt but the one holding its last token come from the cache.
    assert again.num_cached_tokens == (len(prompts[0]) - 1) // 16 * 16
    assert again.token_ids == reference[0]
    # A longer prompt that shares the prefix hits the same blocks, and still equals cold.
    longer = prompts[0] + prompts[1][:30]
    cold = make_engine(tiny_model_dir, enable_prefix_caching=False).generate([longer], SHORT)[0]
    hit = engine.generate([longer], SHORT)[0]
    assert hit.num_cached_tokens >= len(prompts[0]) // 16 * 16
    assert hit.token_ids == cold.token_ids


def test_preemption_and_resume_equal_uninterrupted(tiny_model_dir, prompts, reference, checked):
    # 24 blocks of 16 slots cannot hold six requests of up to 164 tokens at once.
    engine = checked(make_engine(tiny_model_dir, num_kv_blocks=24, max_num_batched_tokens=64))
    outs = engine.generate(prompts, SHORT)
    assert engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == reference


def test_seeded_sampling_is_reproducible_across_batches(tiny_model_dir, prompts, checked):
    seeded = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=1234)
    engine = checked(make_engine(tiny_model_dir))
    [alone] = engine.generate([prompts[0]], seeded)
    noise = [SamplingParams(max_tokens=9, temperature=1.3) for _ in prompts[1:]]
    batched = engine.generate([*prompts[1:], prompts[0]], [*noise, seeded])
    assert batched[-1].token_ids == alone.token_ids
    tight = checked(make_engine(tiny_model_dir, num_kv_blocks=24, max_num_batched_tokens=32))
    assert tight.generate([*prompts[1:], prompts[0]], [*noise, seeded])[-1].token_ids == (
        alone.token_ids
    )
    other = engine.generate([prompts[0]], SamplingParams(max_tokens=20, temperature=1.0, seed=99))
    assert other[0].token_ids != alone.token_ids


def test_abort_frees_every_block(tiny_model_dir, prompts, checked):
    engine = checked(make_engine(tiny_model_dir, max_num_batched_tokens=32))
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, GREEDY)
    for _ in range(5):  # some are mid-prefill, some decoding, some waiting
        engine.step()
    assert engine.pool.usage().in_use > 0
    for i in range(len(prompts)):
        assert engine.abort(f"r{i}")
    assert not engine.abort("r0")
    assert not engine.has_unfinished()
    assert engine.check_integrity().in_use == 0


def test_kv_export_import_round_trip(tiny_model_dir, prompts, reference, checked):
    prefill = checked(make_engine(tiny_model_dir))
    decode = checked(make_engine(tiny_model_dir))
    for p, ref in zip(prompts, reference, strict=True):
        one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        [first] = prefill.generate([p], one, export_kv=True)
        blocks = first.kv_blocks
        assert sum(b.num_tokens for b in blocks) == len(p)
        assert first.token_ids == ref[:1]
        [rest] = decode.generate([p], SHORT, output_token_ids=first.token_ids, kv_blocks=blocks)
        assert first.token_ids + rest.token_ids == ref
        assert len(rest.token_ids) == SHORT.max_tokens - 1


def test_kv_import_with_missing_block_recomputes(tiny_model_dir, prompts, reference, checked):
    prefill = checked(make_engine(tiny_model_dir))
    decode = checked(make_engine(tiny_model_dir, enable_prefix_caching=False))
    p = prompts[5]
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    [first] = prefill.generate([p], one, export_kv=True)
    blocks = list(first.kv_blocks)
    blocks[2] = None  # lost in transit: blocks 2.. are recomputed, 0-1 are used
    [rest] = decode.generate([p], SHORT, output_token_ids=first.token_ids, kv_blocks=blocks)
    assert first.token_ids + rest.token_ids == reference[5]


def test_imported_kv_for_other_tokens_is_not_used(tiny_model_dir, prompts, reference, checked):
    prefill = checked(make_engine(tiny_model_dir))
    decode = checked(make_engine(tiny_model_dir, enable_prefix_caching=False))
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    [wrong] = prefill.generate([prompts[1]], one, export_kv=True)
    [first] = prefill.generate([prompts[0]], one, export_kv=True)
    [rest] = decode.generate(
        [prompts[0]], SHORT, output_token_ids=first.token_ids, kv_blocks=wrong.kv_blocks
    )
    assert first.token_ids + rest.token_ids == reference[0]


def test_what_the_services_ask(tiny_model_dir, prompts, checked):
    """prefix_cache_hits counts the leading cached blocks; kv_block_layout describes the blocks
    the engine exports and accepts (tiny: 2 layers, 2 KV heads of 16, float32, blocks of 16)."""
    engine = checked(make_engine(tiny_model_dir))
    p = prompts[3]
    hashes = hash_blocks(p, engine.block_size, engine.model_id)
    assert engine.prefix_cache_hits(hashes) == 0
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    [done] = engine.generate([p], one, export_kv=True)
    # Every full block of the prompt was computed and stays cached after the request ends; a
    # block the engine never saw ends the run even if later ones are cached.
    assert engine.prefix_cache_hits(hashes) == len(p) // 16
    assert engine.prefix_cache_hits([hashes[0], b"\x01" * 16, *hashes[2:]]) == 1
    layout = engine.kv_block_layout()
    assert layout == KVLayout(2, 2, 16, "float32", 16, "cpu")
    assert all(layout.fits(b.dtype_name, b.kv.shape) for b in done.kv_blocks)
    assert not layout.fits("bfloat16", (2, 2, 16, 2, 16))  # another dtype
    assert not layout.fits("float32", (2, 2, 17, 2, 16))  # more tokens than a block holds
    assert not layout.fits("float32", (2, 2, 16, 4, 8))  # another head layout


def test_a_lone_sequence_on_fewer_threads_gives_the_same_tokens(tiny_model_dir, prompts, reference):
    """cpu_lone_step_threads: a step of one row runs on that many threads, every other step on
    the process's own, and the tokens are those of each prompt alone."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        engine = make_engine(tiny_model_dir, max_num_batched_tokens=4096, cpu_lone_step_threads=1)
        seen = {}
        engine.add_request("long", prompts[0], SHORT)
        engine.add_request("short", prompts[1], SamplingParams(max_tokens=3, temperature=0.0,
                                                               ignore_eos=True))  # fmt: skip
        tokens = {"long": [], "short": []}
        while engine.has_unfinished():
            rows = engine.num_running
            for out in engine.step():
                tokens[out.request_id] += out.new_token_ids
            seen.setdefault(rows, set()).add(torch.get_num_threads())
        assert seen[2] == {2} and seen[1] == {1}, seen
        assert tokens["long"] == reference[0]
        assert tokens["short"] == reference[1][:3]
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="cpu_lone_step_threads"):
        make_engine(tiny_model_dir, cpu_lone_step_threads=-1)
