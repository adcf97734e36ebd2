"""Sampler: exact outcomes on hand-built logits, seeded reproducibility, and distribution."""

from __future__ import annotations

import math

import pytest
import torch

from services.engine.sampler import (
    SampledToken,
    Sampler,
    SamplingRow,
    apply_penalties,
    draw,
    filter_threshold,
    seeded_uniform,
)
from services.engine.sampling_params import SamplingParams as SP


def rows(*params: SP, prompt=(1, 2, 3), output=()) -> list[SamplingRow]:
    return [SamplingRow(p, prompt, output) for p in params]


def ids(out: list[SampledToken]) -> list[int]:
    return [t.token_id for t in out]


def kept(logits: list[float], top_k=0, top_p=1.0, min_p=0.0) -> list[bool]:
    """Which tokens survive the filters, for one row of (already scaled) logits."""
    x = torch.tensor([logits])
    thr = filter_threshold(x, x.softmax(-1), [top_k], [top_p], [min_p])
    return [True] * len(logits) if thr is None else (x >= thr)[0].tolist()


@pytest.fixture
def logits() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 1000, generator=g) * 3  # [B, V]


def test_greedy_is_argmax(logits: torch.Tensor) -> None:
    out = Sampler(0)(logits, rows(*[SP(temperature=0.0)] * 6))
    assert ids(out) == logits.argmax(-1).tolist()
    assert all(t.logprob is None and t.top_logprobs == () for t in out)
    # Any float dtype: the argmax of the bfloat16 logits.
    half = logits.bfloat16()
    assert ids(Sampler(0)(half, rows(*[SP(temperature=0.0)] * 6))) == half.argmax(-1).tolist()


def test_tiny_temperature_is_greedy(logits: torch.Tensor) -> None:
    out = Sampler(0)(logits, rows(*[SP(temperature=1e-7)] * 6))
    assert ids(out) == logits.argmax(-1).tolist()


@pytest.mark.parametrize("params", [SP(temperature=1.3, top_k=1), SP(top_p=1e-6)])
def test_top_k_1_and_tiny_top_p_are_greedy(logits: torch.Tensor, params: SP) -> None:
    # Only the best token survives the filter, whatever the draw; seeded or not.
    sampler = Sampler(0)
    for seed in (None, 7):
        p = SP(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, seed=seed)
        for _ in range(5):
            assert ids(sampler(logits, rows(*[p] * 6))) == logits.argmax(-1).tolist()


# Probabilities 0.5, 0.3, 0.15, 0.05: the filters' cut points are far from rounding.
P4 = [math.log(p) for p in (0.5, 0.3, 0.15, 0.05)]


def test_top_k_keeps_the_k_best() -> None:
    assert kept(P4, top_k=2) == [True, True, False, False]
    assert kept(P4, top_k=4) == [True] * 4  # k >= V: off
    assert kept(P4, top_k=-1) == [True] * 4


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    assert kept(P4, top_p=0.45) == [True, False, False, False]  # 0.5 >= 0.45
    assert kept(P4, top_p=0.75) == [True, True, False, False]  # 0.8 >= 0.75
    assert kept(P4, top_p=0.85) == [True, True, True, False]  # 0.95 >= 0.85
    assert kept(P4, top_p=0.99) == [True] * 4
    # After top_k=2 the mass is renormalised: 0.625, 0.375.
    assert kept(P4, top_k=2, top_p=0.6) == [True, False, False, False]
    assert kept(P4, top_k=2, top_p=0.7) == [True, True, False, False]


def test_min_p_drops_tokens_below_a_fraction_of_the_best() -> None:
    # min_p 0.2 * 0.5 = 0.1: 0.05 goes; min_p 0.5 * 0.5 = 0.25: 0.15 goes as well.
    assert kept(P4, min_p=0.2) == [True, True, True, False]
    assert kept(P4, min_p=0.5) == [True, True, False, False]
    assert kept(P4, min_p=1.0) == [True, False, False, False]


def test_top_p_at_every_search_stage_matches_a_full_sort() -> None:
    # The nucleus is searched among the best 64, then 1024, then 8192 tokens, then all of them;
    # whichever stage finds it, the cut must equal the one a full sort gives.
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 20000, generator=g)  # [S, V], flat: nuclei of 2 to 19631 tokens
    probs = x.softmax(-1)
    order = x.sort(-1, descending=True).indices
    mass = probs.gather(1, order).cumsum(-1)
    sizes = []
    for p in (0.002, 0.02, 0.1, 0.3, 0.9, 0.999):
        thr = filter_threshold(x, probs, [0] * 4, [p] * 4, [0.0] * 4)
        n_keep = (mass < p).sum(-1) + 1  # tokens up to and including the one reaching p
        assert ((x >= thr).sum(-1) == n_keep).all()
        sizes += n_keep.tolist()
    assert min(sizes) <= 64 and max(sizes) > 8192
    assert any(64 < n <= 1024 for n in sizes) and any(1024 < n <= 8192 for n in sizes)


def test_sampling_never_picks_a_filtered_token() -> None:
    logits = torch.tensor([P4] * 200)
    params = [SP(min_p=0.2, seed=s) for s in range(200)]
    out = ids(Sampler(0)(logits, rows(*params)))
    assert set(out) == {0, 1, 2}


def test_penalties_exact_values() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 1.0]] * 2)  # [B, V]
    both = SamplingRow(
        SP(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25),
        prompt_token_ids=[0, 1],
        output_token_ids=[3, 3, 2],
    )
    plain = SamplingRow(SP(), [0, 1], [3, 3, 2])
    apply_penalties(logits, [both, plain])
    # Repetition over prompt + output {0, 1, 2, 3}: 2/2, -1*2, 0.5/2, 3/2; 4 unseen.
    # Then output counts {3: 2, 2: 1}: 1.5 - (0.25*2 + 0.5), 0.25 - (0.25*1 + 0.5).
    assert logits[0].tolist() == [1.0, -2.0, -0.5, 0.5, 1.0]
    assert logits[1].tolist() == [2.0, -1.0, 0.5, 3.0, 1.0]  # no penalties: untouched


def test_presence_and_frequency_ignore_the_prompt() -> None:
    logits = torch.tensor([[1.0, 1.0, 1.0]])
    apply_penalties(logits, [SamplingRow(SP(presence_penalty=1.0), [0, 1], [1])])
    assert logits[0].tolist() == [1.0, 0.0, 1.0]


def test_repetition_penalty_changes_the_greedy_choice() -> None:
    logits = torch.tensor([[3.0, 2.0, 0.0]])
    sampler = Sampler(0)
    assert ids(sampler(logits, rows(SP(temperature=0.0), prompt=[0]))) == [0]
    # 3 / 2 = 1.5 < 2.
    assert ids(sampler(logits, rows(SP(temperature=0.0, repetition_penalty=2.0), prompt=[0]))) == [
        1
    ]


def test_min_tokens_blocks_eos_and_stop_ids() -> None:
    eos, stop = 0, 1
    logits = torch.tensor([[9.0, 8.0, 1.0, 0.0]])
    base = dict(temperature=0.0, eos_token_ids=(eos,), stop_token_ids=(stop,), min_tokens=3)
    sampler = Sampler(0)
    # Two tokens generated, min_tokens 3: neither EOS nor the stop id may come next.
    assert ids(sampler(logits, rows(SP(**base), output=[5, 5]))) == [2]
    # Three generated: free to stop.
    assert ids(sampler(logits, rows(SP(**base), output=[5, 5, 5]))) == [eos]
    # ignore_eos: EOS is no stop, so it is not blocked; the stop id still is.
    assert ids(sampler(logits, rows(SP(**base, ignore_eos=True), output=[5]))) == [eos]
    logits2 = torch.tensor([[8.0, 9.0, 1.0, 0.0]])
    assert ids(sampler(logits2, rows(SP(**base, ignore_eos=True), output=[5]))) == [eos]
    # Sampled rows too: EOS and stop id carry 0 probability however likely they were.
    hot = SP(**{**base, "temperature": 1.0}, seed=3)
    out = ids(sampler(logits.expand(50, 4), [SamplingRow(hot, [], [5] * i) for i in range(50)]))
    assert eos not in out[:3] and stop not in out[:3]


def test_logprobs_are_raw_log_softmax_with_top_n(logits: torch.Tensor) -> None:
    raw = torch.log_softmax(logits.float(), -1)
    params = [
        SP(temperature=0.5, repetition_penalty=1.5, logprobs=5, seed=1),  # processed != raw
        SP(temperature=0.0, logprobs=0),
        SP(temperature=0.0, logprobs=20),
        SP(temperature=0.0),
        SP(temperature=2.0, top_k=3, logprobs=3),
        SP(temperature=0.0, logprobs=1),
    ]
    out = Sampler(0)(logits, rows(*params, prompt=list(range(0, 1000, 2))))
    for row, (tok, p) in enumerate(zip(out, params, strict=True)):
        if p.logprobs is None:
            assert tok.logprob is None and tok.top_logprobs == ()
            continue
        assert tok.logprob == pytest.approx(raw[row, tok.token_id].item(), abs=1e-6)
        best = raw[row].topk(p.logprobs)
        assert [i for i, _ in tok.top_logprobs] == best.indices.tolist()
        assert [v for _, v in tok.top_logprobs] == pytest.approx(best.values.tolist(), abs=1e-6)
        values = [v for _, v in tok.top_logprobs]
        assert values == sorted(values, reverse=True)  # best first
    assert out[1].top_logprobs == ()  # logprobs=0: the chosen token's only


def seeded_run(
    logits: torch.Tensor, target: SP, others: list[SP], at: int, steps: int, sampler_seed: int
) -> list[int]:
    """Tokens of the `target` row over `steps` positions, placed at row `at` among others."""
    sampler = Sampler(sampler_seed)
    out: list[int] = []
    for _ in range(steps):
        params = [*others[:at], target, *others[at:]]
        batch_rows = [SamplingRow(p, [1, 2, 3], list(out)) for p in params]
        row = logits[len(out) % logits.shape[0]]
        # Other rows carry different logits; the target row always gets `row`.
        x = torch.randn(len(params), logits.shape[1]) * 2
        x[at] = row
        out.append(sampler(x, batch_rows)[at].token_id)
    return out


def test_seeded_rows_do_not_depend_on_the_batch() -> None:
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 49152, generator=g) * 2  # a flat-ish row: many likely tokens
    target = SP(temperature=0.9, top_p=0.95, min_p=0.01, repetition_penalty=1.1, seed=1234)
    others = [
        SP(temperature=0.0),
        SP(temperature=1.0),
        SP(temperature=0.7, top_k=40, seed=5),
        SP(temperature=1.0, frequency_penalty=0.5, logprobs=3),
        SP(temperature=1.2, top_p=0.5),
    ]
    alone = seeded_run(logits, target, [], 0, 6, sampler_seed=0)
    assert len(set(alone)) > 1  # the draws really vary with the position
    assert seeded_run(logits, target, others, 0, 6, sampler_seed=1) == alone
    assert seeded_run(logits, target, others, 3, 6, sampler_seed=2) == alone
    assert seeded_run(logits, target, others[::-1], 5, 6, sampler_seed=3) == alone
    assert seeded_run(logits, target, others[:2] * 8, 9, 6, sampler_seed=4) == alone


def test_seeded_draw_depends_only_on_seed_and_position() -> None:
    # Resuming at position 7 (after preemption or in another process) draws what position 7
    # drew before: nothing but the output length is carried.
    logits = torch.randn(1, 5000, generator=torch.Generator().manual_seed(3))
    p = SP(temperature=1.0, seed=99)
    first = [Sampler(0)(logits, rows(p, output=[0] * n))[0].token_id for n in range(10)]
    again = [Sampler(1)(logits, rows(p, output=[4] * n))[0].token_id for n in range(10)]
    assert first == again
    assert seeded_uniform(99, 7) == seeded_uniform(99, 7) != seeded_uniform(99, 8)


def test_different_seeds_differ() -> None:
    logits = torch.zeros(1, 1000)  # uniform: any two draws collide with chance 1/1000
    out = {Sampler(0)(logits, rows(SP(seed=s)))[0].token_id for s in range(20)}
    assert len(out) >= 15


def _frequencies(tokens: list[int], vocab: int) -> torch.Tensor:
    return torch.bincount(torch.tensor(tokens), minlength=vocab).double() / len(tokens)


def test_unseeded_sampling_matches_softmax() -> None:
    # 20000 draws: a frequency's standard error is at most 0.0035, so 0.015 is > 4 sigma.
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 1.5, 0.2, -3.0])
    expected = logits.softmax(-1).double()
    sampler = Sampler(0)
    batch = logits.expand(2000, 8)
    tokens: list[int] = []
    for _ in range(10):
        tokens += ids(sampler(batch, rows(*[SP(temperature=1.0)] * 2000)))
    assert (_frequencies(tokens, 8) - expected).abs().max() < 0.015


def test_seeded_sampling_matches_softmax_over_seeds() -> None:
    # The hash-derived uniforms are uniform too: 20000 seeds at one position.
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 1.5, 0.2, -3.0])
    expected = (logits / 0.7).softmax(-1).double()
    batch = logits.expand(2000, 8)
    sampler = Sampler(0)
    tokens: list[int] = []
    for chunk in range(10):
        params = [SP(temperature=0.7, seed=chunk * 2000 + i) for i in range(2000)]
        tokens += ids(sampler(batch, rows(*params)))
    assert (_frequencies(tokens, 8) - expected).abs().max() < 0.015


def test_top_p_sampling_renormalises() -> None:
    # top_p 0.75 keeps 0.5 and 0.3, which become 0.625 and 0.375.
    logits = torch.tensor([P4]).expand(2000, 4)
    sampler = Sampler(0)
    tokens: list[int] = []
    for _ in range(5):
        tokens += ids(sampler(logits, rows(*[SP(top_p=0.75)] * 2000)))
    freq = _frequencies(tokens, 4)
    assert freq[2] == 0 and freq[3] == 0
    assert abs(freq[0].item() - 0.625) < 0.02


def test_draw_edges() -> None:
    vocab = 2500  # not a multiple of the CDF block: the padded tail must never be drawn
    for hot in (0, 1023, 1024, 2047, 2499):
        w = torch.zeros(3, vocab)
        w[:, hot] = 0.5
        u = torch.tensor([0.0, 0.5, 1 - 2**-53], dtype=torch.float64)
        assert draw(w, u).tolist() == [hot] * 3
    # Two tokens: u below the first one's share picks it, above picks the second.
    w = torch.zeros(2, vocab)
    w[:, 10], w[:, 2000] = 1.0, 3.0
    assert draw(w, torch.tensor([0.2499, 0.2501], dtype=torch.float64)).tolist() == [10, 2000]


def test_rejects_mismatched_rows(logits: torch.Tensor) -> None:
    with pytest.raises(ValueError):
        Sampler(0)(logits, rows(SP()))
