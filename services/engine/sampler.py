"""Turn a batch of next-token logits into tokens, one SamplingParams per row.

Order of operations (vLLM/HF/OpenAI semantics):
  1. logprobs: log_softmax of the raw logits in float32 (vLLM's default "raw_logprobs"),
  2. min_tokens: EOS and stop token ids get -inf while the output is shorter than min_tokens,
  3. penalties: repetition over prompt + output, then frequency and presence over output,
  4. greedy rows: argmax,
  5. sampled rows: temperature, then top_k, top_p, min_p, then one draw.

top_k, top_p and min_p each keep the tokens whose scaled logit is at least some per-row
threshold, so the three fold into one threshold and one pass over the vocabulary; only top_p
needs sorted probabilities, and it looks for its cut among the best 64 tokens first.

The draw is inverse-CDF sampling with a single uniform number per row. For a seeded row that
number is a hash of (seed, output position), so the token depends on nothing else: not on the
other rows of the batch, not on the device or process, not on how many steps ran before a
preemption or a prefill/decode hand-off. One number instead of V exponentials (the
exponential race) also lets seeded rows share every batched op with unseeded ones.

Batch invariance also needs the per-row arithmetic to be bitwise independent of the batch. On
CPU that holds for what is used here: softmax, log_softmax and cumsum run one row at a time;
topk returns exact values; elementwise +, -, *, / round the same in vector and scalar code.
Elementwise exp is avoided on purpose: its vector and scalar tails may differ in the last bit,
and where a row falls relative to those tails depends on the batch size.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from services.engine.sampling_params import SamplingParams

# Temperatures below this divide logits into overflow; vLLM treats them as greedy too.
_MIN_TEMPERATURE = 1e-5

# How many of the best tokens top_p searches for its cut, widening only for rows whose nucleus
# is wider (flat distributions); the last stage is a full sort.
_TOP_P_STAGES = (64, 1024, 8192)

# The CDF is summed in float32 within blocks of this many tokens and in float64 across blocks:
# a float32 running sum over 128k tokens would swallow the tail, a float64 cumsum over the whole
# vocabulary costs ~10x more on CPU.
_CDF_BLOCK = 1024


@dataclass(frozen=True)
class SamplingRow:
    params: SamplingParams
    prompt_token_ids: Sequence[int]
    # Tokens generated so far; the token being sampled is output position len(output_token_ids).
    output_token_ids: Sequence[int]


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprob: float | None  # None unless params.logprobs is not None
    top_logprobs: tuple[tuple[int, float], ...]  # top-n (id, logprob), best first


def seeded_uniform(seed: int, position: int) -> float:
    """A uniform number in [0, 1) that depends only on (seed, position).

    A keyed hash rather than a torch.Generator: generator streams differ between CPU and CUDA,
    and a hash needs no state to carry across preemption or between processes.
    """
    digest = hashlib.blake2b(f"{seed}:{position}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "little") >> 11) * 2.0**-53


def _has_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def _is_greedy(p: SamplingParams) -> bool:
    return p.temperature < _MIN_TEMPERATURE


def _index(idx: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(idx, dtype=torch.long, device=device)


def _rows(x: torch.Tensor, idx: Sequence[int]) -> torch.Tensor:
    """x[idx] without a copy when idx is every row in order."""
    if len(idx) == x.shape[0] and all(i == j for j, i in enumerate(idx)):
        return x
    return x[_index(idx, x.device)]


def _unique_pairs(
    id_lists: Sequence[Sequence[int]], vocab: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The distinct (list index, token id) pairs of id_lists and how often each occurs.

    Built from tensors, with no Python loop over tokens. Returns (list_idx [N], token [N],
    count [N]).
    """
    parts = [torch.as_tensor(ids, dtype=torch.long).reshape(-1) for ids in id_lists]
    lengths = torch.tensor([p.numel() for p in parts], dtype=torch.long)
    tokens = torch.cat(parts)
    owner = torch.repeat_interleave(torch.arange(len(parts)), lengths)
    # An id the model cannot produce (tokenizer ids past a trimmed head) has no logit to move,
    # and would alias another row's key.
    valid = (tokens >= 0) & (tokens < vocab)
    keys, counts = torch.unique(owner[valid] * vocab + tokens[valid], return_counts=True)
    keys, counts = keys.to(device), counts.to(device)
    return keys // vocab, keys % vocab, counts


def apply_min_tokens(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """Forbid stopping before min_tokens: EOS (unless ignore_eos) and stop ids get -inf.

    logits: [B, V] float, modified in place.
    """
    vocab = logits.shape[1]
    r_idx: list[int] = []
    t_idx: list[int] = []
    for i, row in enumerate(rows):
        p = row.params
        if len(row.output_token_ids) >= p.min_tokens:
            continue
        blocked = set(p.stop_token_ids)
        if not p.ignore_eos:
            blocked.update(p.eos_token_ids)
        # The model's vocabulary can be smaller than the tokenizer's id space (a padded or
        # trimmed head); an id it cannot produce needs no blocking.
        ids = [t for t in blocked if t < vocab]
        r_idx.extend([i] * len(ids))
        t_idx.extend(ids)
    if r_idx:
        logits[_index(r_idx, logits.device), _index(t_idx, logits.device)] = -math.inf


def apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """Repetition (HF/vLLM) over prompt + output, then frequency/presence (OpenAI) over output.

    Repetition: a seen token's positive logit is divided by the penalty, a negative one
    multiplied. Frequency/presence: logit -= frequency * count + presence * (count > 0).
    Only the logits of tokens that occur are read and written, so the cost follows the number
    of prompt and output tokens, not B * V. logits: [B, V] float32, modified in place.
    """
    dev = logits.device
    vocab = logits.shape[1]

    rep = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0]
    if rep:
        seen = [[*rows[i].prompt_token_ids, *rows[i].output_token_ids] for i in rep]
        owner, tok, _ = _unique_pairs(seen, vocab, dev)  # owner indexes `rep`
        row = _index(rep, dev)[owner]
        penalty = torch.tensor(
            [rows[i].params.repetition_penalty for i in rep], dtype=logits.dtype, device=dev
        )[owner]
        s = logits[row, tok]  # [N]
        logits[row, tok] = torch.where(s > 0, s / penalty, s * penalty)

    fp = [
        i
        for i, r in enumerate(rows)
        if (r.params.frequency_penalty != 0.0 or r.params.presence_penalty != 0.0)
        and len(r.output_token_ids) > 0
    ]
    if fp:
        owner, tok, count = _unique_pairs([rows[i].output_token_ids for i in fp], vocab, dev)
        row = _index(fp, dev)[owner]
        freq = torch.tensor(
            [rows[i].params.frequency_penalty for i in fp], dtype=logits.dtype, device=dev
        )[owner]
        pres = torch.tensor(
            [rows[i].params.presence_penalty for i in fp], dtype=logits.dtype, device=dev
        )[owner]
        logits[row, tok] -= freq * count.to(logits.dtype) + pres  # [N], one per distinct token


def _top_p_cut(
    vals: torch.Tensor,
    probs: torch.Tensor,
    top_p: torch.Tensor,
    floor: torch.Tensor,
    renorm: torch.Tensor,
    width: torch.Tensor,
    vocab: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The logit of the last token of each row's nucleus, searched among its `width` best.

    vals, probs: [P, n] the n best scaled logits of each row (best first) and their
    probabilities; top_p, floor (the top_k cut, -inf when off), width (<= n): [P]; renorm: [P]
    bool, True where top_k is on, so top_p measures mass within the top-k set. Returns
    (cut [P], found [P] bool); a row not found has a nucleus wider than its width. A row uses
    only its own first `width` candidates, so its cut does not depend on the rest of the batch.
    """
    n = vals.shape[1]
    in_set = torch.arange(n, device=vals.device) < width.unsqueeze(1)
    in_set &= vals >= floor.unsqueeze(1)
    mass = (probs * in_set).cumsum(dim=-1)  # [P, n]
    total = mass[:, -1]
    target = top_p * torch.where(renorm, total, torch.ones_like(total))  # [P]
    # Where rounding leaves the whole mass a hair under top_p, the last candidate is the cut.
    last = torch.searchsorted(mass, target.unsqueeze(1)).clamp_(max=n - 1)  # [P, 1]
    cut = vals.gather(1, last).squeeze(1)
    found = renorm | (total >= target) | (width >= vocab)
    return cut, found


def filter_threshold(
    x: torch.Tensor,
    probs: torch.Tensor,
    top_k: Sequence[int],
    top_p: Sequence[float],
    min_p: Sequence[float],
) -> torch.Tensor | None:
    """Per-row logit threshold that applies top_k, then top_p, then min_p (HF order).

    x: [S, V] temperature-scaled logits, probs: softmax(x). Returns thr: [S, 1]; the tokens
    kept are x >= thr (tokens tied with a cut are kept). None when no row filters anything.
    top_k <= 0 or >= V disables it. min_p keeps p_i >= min_p * p_max, i.e.
    x_i >= x_max + log(min_p): a ratio, unchanged by renormalisation, so it does not matter
    that it comes after top_k/top_p (the best token survives both).
    """
    num, vocab = x.shape
    dev = x.device
    ks = [k if 0 < k < vocab else 0 for k in top_k]
    cand = [i for i in range(num) if ks[i] or top_p[i] < 1.0]
    need_m = [i for i in range(num) if min_p[i] > 0.0]
    if not (cand or need_m):
        return None
    thr = torch.full((num,), -math.inf, dtype=x.dtype, device=dev)  # [S]

    if cand:
        # One topk serves both: the k-th value is the top_k cut, and the first few dozen
        # are where top_p's nucleus usually ends.
        c_idx = _index(cand, dev)
        first = _TOP_P_STAGES[0]
        width = [min(vocab, max(ks[i], first if top_p[i] < 1.0 else 0)) for i in cand]
        vals, ids = _rows(x, cand).topk(max(width), dim=-1)  # [C, n], best first
        k = _index([max(ks[i], 1) for i in cand], dev).unsqueeze(1)  # [C, 1]
        floor = torch.where(
            _index([ks[i] for i in cand], dev) > 0,
            vals.gather(1, k - 1).squeeze(1),
            torch.full_like(vals[:, 0], -math.inf),
        )  # [C]
        thr[c_idx] = floor

        pos = [j for j, i in enumerate(cand) if top_p[i] < 1.0]
        if pos:
            p_pos = _index(pos, dev)
            p_rows = c_idx[p_pos]  # [P]
            target = torch.tensor([top_p[cand[j]] for j in pos], dtype=x.dtype, device=dev)
            p_floor = floor[p_pos]
            renorm = _index([ks[cand[j]] for j in pos], dev) > 0
            p_width = _index([width[j] for j in pos], dev)
            pv, pi = vals[p_pos], ids[p_pos]  # [P, n]
            cut, found = _top_p_cut(
                pv, probs[p_rows.unsqueeze(1), pi], target, p_floor, renorm, p_width, vocab
            )
            todo = (~found).nonzero().squeeze(1)
            for stage in (*_TOP_P_STAGES[1:], vocab):
                if todo.numel() == 0:
                    break
                # Flat rows only: widen the search, ending with a full sort.
                rows_t = p_rows[todo]
                xs = x[rows_t]  # [W, V]
                if stage >= vocab:
                    wv, wi = xs.sort(dim=-1, descending=True)
                else:
                    wv, wi = xs.topk(stage, dim=-1)
                w_width = torch.full_like(todo, min(stage, vocab))
                c, f = _top_p_cut(
                    wv,
                    probs[rows_t.unsqueeze(1), wi],
                    target[todo],
                    p_floor[todo],
                    renorm[todo],
                    w_width,
                    vocab,
                )
                cut[todo[f]] = c[f]
                todo = todo[~f]
            thr[p_rows] = torch.maximum(p_floor, cut)

    if need_m:
        m_idx = _index(need_m, dev)
        top = _rows(x, need_m).max(dim=-1).values  # [M]
        log_min_p = torch.tensor([math.log(min_p[i]) for i in need_m], dtype=x.dtype, device=dev)
        thr[m_idx] = torch.maximum(thr[m_idx], top + log_min_p)

    return thr.unsqueeze(1)


def draw(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: the token whose cumulative-weight interval holds u * total.

    weights: [S, V] non-negative, need not sum to 1; uniforms: [S] float64 in [0, 1).
    Returns [S] token ids; a token of weight 0 is never drawn.
    """
    num, vocab = weights.shape
    dev = weights.device
    blocks = -(-vocab // _CDF_BLOCK)
    if blocks * _CDF_BLOCK != vocab:
        weights = F.pad(weights, (0, blocks * _CDF_BLOCK - vocab))
    inner = weights.reshape(num, blocks, _CDF_BLOCK).cumsum(dim=-1)  # [S, C, blk]
    outer = inner[..., -1].to(torch.float64).cumsum(dim=-1)  # [S, C]
    total = outer[:, -1:]  # [S, 1]
    target = uniforms.unsqueeze(1) * total  # [S, 1]

    def pick(cdf: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
        # at < cdf[-1] lands on a positive-weight slot; rounding can put `at` on cdf[-1] itself,
        # and then the last positive-weight slot owns it.
        hit = torch.searchsorted(cdf, at, right=True)
        last = torch.searchsorted(cdf, cdf[:, -1:].contiguous(), right=False)
        return torch.minimum(hit, last)  # [S, 1]

    blk = pick(outer, target)  # [S, 1]
    before = outer.gather(1, (blk - 1).clamp_(min=0)).masked_fill_(blk == 0, 0.0)
    within = inner[torch.arange(num, device=dev), blk.squeeze(1)].to(torch.float64)  # [S, blk]
    slot = pick(within, target - before)  # [S, 1]
    # The clamp only matters for a row with no finite logit at all (NaN weights).
    return (blk * _CDF_BLOCK + slot).squeeze(1).clamp_(max=vocab - 1)


class Sampler:
    def __init__(self, seed: int | None = None) -> None:
        # Unseeded rows draw from here. It lives on the CPU whatever the logits' device, so one
        # seed reproduces a run on any device; it supplies one number per sampled row per step.
        self._generator = torch.Generator(device="cpu")
        if seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> list[SampledToken]:
        # logits: [B, V], any float dtype, any device
        if not rows:
            if logits.dim() != 2 or logits.shape[0] != 0:
                raise ValueError(f"logits {tuple(logits.shape)} do not match 0 rows")
            return []
        tokens, want_lp, raw_lp = self.sample_tokens(logits, rows)
        return self.package(tokens.tolist(), [r.params for r in rows], want_lp, raw_lp)

    @staticmethod
    def is_plain_greedy(rows: Sequence[SamplingRow]) -> bool:
        """Every row is an argmax of the raw logits: no logprobs, penalties or min_tokens."""
        return all(
            _is_greedy(r.params)
            and r.params.logprobs is None
            and not _has_penalty(r.params)
            and len(r.output_token_ids) >= r.params.min_tokens
            for r in rows
        )

    def sample_tokens(
        self, logits: torch.Tensor, rows: Sequence[SamplingRow]
    ) -> tuple[torch.Tensor, list[int], torch.Tensor | None]:
        """The sampled ids on the logits' device, without waiting for them: (tokens [B], the
        rows that want logprobs, their raw log-probabilities [L, V] or None). `package` turns
        them into SampledTokens once the ids are on the host."""
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits {tuple(logits.shape)} do not match {len(rows)} rows")
        dev = logits.device
        params = [r.params for r in rows]

        want_lp = [i for i, p in enumerate(params) if p.logprobs is not None]
        raw_lp = None
        if want_lp:
            raw_lp = torch.log_softmax(_rows(logits, want_lp).float(), dim=-1)  # [L, V]

        greedy = [i for i, p in enumerate(params) if _is_greedy(p)]
        sampled = [i for i, p in enumerate(params) if not _is_greedy(p)]
        adjust = any(
            _has_penalty(r.params) or len(r.output_token_ids) < r.params.min_tokens for r in rows
        )

        if not sampled and not adjust:
            # The common greedy batch: one argmax. float() first: a CPU argmax over bfloat16 is
            # slower than the conversion plus a float32 argmax.
            tokens = logits.float().argmax(dim=-1)  # [B]
        else:
            tokens = torch.empty(len(rows), dtype=torch.long, device=dev)  # [B]
            x = logits.to(torch.float32, copy=adjust)  # [B, V], a copy where edited in place
            apply_min_tokens(x, rows)
            apply_penalties(x, rows)
            if greedy:
                tokens[_index(greedy, dev)] = _rows(x, greedy).argmax(dim=-1)
            if sampled:
                tokens[_index(sampled, dev)] = self._sample(_rows(x, sampled), rows, sampled)
        return tokens, want_lp, raw_lp

    def _sample(
        self, x: torch.Tensor, rows: Sequence[SamplingRow], which: Sequence[int]
    ) -> torch.Tensor:
        # x: [S, V] float32 processed logits of rows[which]; returns [S] token ids
        dev = x.device
        ps = [rows[i].params for i in which]
        if any(p.temperature != 1.0 for p in ps):
            temp = torch.tensor([p.temperature for p in ps], dtype=x.dtype, device=dev)
            x = x / temp.unsqueeze(1)  # [S, V]
        probs = x.softmax(dim=-1)  # [S, V]
        thr = filter_threshold(
            x, probs, [p.top_k for p in ps], [p.top_p for p in ps], [p.min_p for p in ps]
        )
        if thr is not None:
            probs = probs * (x >= thr)  # [S, V], filtered tokens weigh 0

        uniforms = [0.0] * len(which)
        unseeded = [j for j, p in enumerate(ps) if p.seed is None]
        if unseeded:
            fresh = torch.rand(len(unseeded), generator=self._generator, dtype=torch.float64)
            for j, u in zip(unseeded, fresh.tolist(), strict=True):
                uniforms[j] = u
        for j, i in enumerate(which):
            seed = ps[j].seed
            if seed is not None:
                uniforms[j] = seeded_uniform(seed, len(rows[i].output_token_ids))
        return draw(probs, torch.tensor(uniforms, dtype=torch.float64, device=dev))

    @staticmethod
    def package(
        token_list: list[int],
        params: Sequence[SamplingParams],
        want_lp: Sequence[int],
        raw_lp: torch.Tensor | None,
    ) -> list[SampledToken]:
        out = [SampledToken(t, None, ()) for t in token_list]
        if raw_lp is None:
            return out
        dev = raw_lp.device
        chosen_ids = _index([token_list[i] for i in want_lp], dev).unsqueeze(1)  # [L, 1]
        chosen = raw_lp.gather(1, chosen_ids).squeeze(1).tolist()
        n_max = min(max(params[i].logprobs or 0 for i in want_lp), raw_lp.shape[1])
        top_vals: list[list[float]] = [[] for _ in want_lp]
        top_ids: list[list[int]] = [[] for _ in want_lp]
        if n_max > 0:
            best = raw_lp.topk(n_max, dim=-1)  # [L, n_max], best first
            top_vals, top_ids = best.values.tolist(), best.indices.tolist()
        for j, i in enumerate(want_lp):
            n = params[i].logprobs or 0
            top = tuple(zip(top_ids[j][:n], top_vals[j][:n], strict=True))
            out[i] = SampledToken(token_list[i], chosen[j], top)
        return out
