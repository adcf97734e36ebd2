"""Attention offload (Lamina): the model worker's view of a step whose KV lives elsewhere.

In offload mode a model worker holds weights and no KV. Its scheduler still owns the block
table (block ids, prefix cache, preemption), but every block's K/V lives on attention workers,
each holding a range of KV heads of every block (so adding workers adds memory and bandwidth).
Per layer the model worker sends each worker the step's q, k, v of its heads and gets back
their attention output: q [N, Hs*G, D] and k, v [N, Hs, D] out, o [N, Hs*G, D] back, which is
(2 + 2/G) * e * d bytes per token and layer in all.

The engine does no networking: the services give it an AttentionShards (services/
offload_client.py talks gRPC to attention workers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch


def head_ranges(num_kv_heads: int, num_workers: int) -> list[tuple[int, int]]:
    """KV heads [start, end) of each worker: contiguous, sizes differing by at most one."""
    if not 1 <= num_workers <= num_kv_heads:
        raise ValueError(
            f"{num_workers} attention workers for {num_kv_heads} KV heads: each needs one or more"
        )
    base, extra = divmod(num_kv_heads, num_workers)
    out, start = [], 0
    for i in range(num_workers):
        end = start + base + (1 if i < extra else 0)
        out.append((start, end))
        start = end
    return out


@dataclass(frozen=True)
class PrefillChunk:
    query_start: int  # first row in the (micro-)batch
    num_query: int
    seq_len: int  # context length including the chunk
    table: np.ndarray | None  # int64 block ids of the whole context; None: no cached prefix


@dataclass(frozen=True)
class StepLayout:
    """What an attention worker needs to store and attend one (micro-)batch: decodes first,
    one row each, then prefill chunks. q_first: a decode-only batch whose q arrives before its
    k, v (the worker attends the cached prefix meanwhile)."""

    num_decode: int
    slot_mapping: np.ndarray  # int64 [N]
    decode_table: np.ndarray  # int64 [num_decode, W], padded with block 0
    decode_lens: np.ndarray  # int64 [num_decode] context length including the new token
    prefills: tuple[PrefillChunk, ...]
    q_first: bool = False
    # Blocks whose content got a hash since the last step: (block id, hash). Workers keep them
    # beside the KV (forgetting a block's once its slots are written again), so a replacement
    # model worker can find its predecessor's blocks.
    cached: tuple[tuple[int, bytes], ...] = ()

    @property
    def num_rows(self) -> int:
        return len(self.slot_mapping)


@dataclass(frozen=True)
class MicroBatch:
    """Rows [row_start, row_end) of the step, attended as one batch (tag) on every worker;
    logits_rows: the rows (relative to row_start) whose logits are sampled."""

    tag: int
    row_start: int
    row_end: int
    layout: StepLayout
    logits_rows: list[int]


def split_step(layout: StepLayout, logits_rows: list[int], two: bool) -> list[MicroBatch]:
    """The step as one batch, or (two, and at least two decodes) as two: the first half of
    the decodes, then the other decodes with the prefill chunks. Two batches let the model
    worker run one's dense layers while the other's attention runs remotely (ping-pong)."""
    n = layout.num_rows
    nd = layout.num_decode
    if not two or nd < 2:
        return [MicroBatch(0, 0, n, layout, list(logits_rows))]
    a = nd // 2
    first = StepLayout(
        a, layout.slot_mapping[:a], layout.decode_table[:a], layout.decode_lens[:a], (),
        layout.q_first, layout.cached,
    )  # fmt: skip
    second = StepLayout(
        nd - a, layout.slot_mapping[a:], layout.decode_table[a:], layout.decode_lens[a:],
        tuple(
            PrefillChunk(p.query_start - a, p.num_query, p.seq_len, p.table)
            for p in layout.prefills
        ),
        layout.q_first,
    )  # fmt: skip
    return [
        MicroBatch(0, 0, a, first, [r for r in logits_rows if r < a]),
        MicroBatch(1, a, n, second, [r - a for r in logits_rows if r >= a]),
    ]


class WorkerLostError(RuntimeError):
    """An attention worker stopped answering: the K/V of its heads is gone for every sequence,
    which must be recomputed once a worker holds those heads again."""

    def __init__(self, worker: int, why: str = "") -> None:
        super().__init__(f"attention worker {worker} is lost{': ' + why if why else ''}")
        self.worker = worker


class PendingOut(Protocol):
    def result(self) -> torch.Tensor:
        """o [rows, Hs*G, D] of the batch sent, in the model's dtype; raises WorkerLostError."""
        ...


class AttentionShards(Protocol):
    """The model worker's attention workers; worker i holds KV heads heads[i]. Calls come
    from the engine's thread only."""

    heads: list[tuple[int, int]]
    # Blocks a model worker that went away left, found in place on every worker at attach:
    # (block id, content hash), for the prefix cache.
    adopted: list[tuple[int, bytes]]

    def begin_step(self, tag: int, layout: StepLayout) -> None:
        """Announce batch `tag`'s layout to every worker; its layer batches follow."""
        ...

    def load_blocks(self, loads: list[tuple[int, torch.Tensor]]) -> None:
        """Write handed-off KV (block id, [L, 2, T, Hkv, D]) where it lives, each worker its
        heads; returns once every worker has it."""
        ...

    def send(
        self, worker: int, tag: int, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> PendingOut:
        """One layer of batch `tag` to one worker: its heads' q, k, v. Returns at once."""
        ...

    def send_q(self, worker: int, tag: int, layer: int, q: torch.Tensor) -> PendingOut:
        """q first (a q_first batch): the worker attends the cached prefix until k, v come."""
        ...

    def send_kv(self, worker: int, tag: int, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """The k, v that complete the send_q of the same worker, batch and layer."""
        ...

    def recover(self) -> None:
        """After a WorkerLostError: wait until every head range has a live worker again (the
        lost K/V is gone; the engine recomputes its sequences)."""
        ...


@dataclass
class OffloadCounters:
    """The model worker's side of offload, for metrics and benchmarks."""

    steps: int = 0
    step_seconds: float = 0.0  # forward passes, start to logits
    wait_seconds: float = 0.0  # of which blocked on attention workers' answers
    bytes_sent: int = 0  # q, k, v
    bytes_received: int = 0  # o
    token_layers: int = 0  # rows of the steps times layers: the bytes' denominator
    round_trips: int = 0  # layer batches sent and answered
    round_trip_seconds: float = 0.0  # from a batch's last send to its answer in hand

    @property
    def idle_fraction(self) -> float:
        return self.wait_seconds / self.step_seconds if self.step_seconds else 0.0

    @property
    def bytes_per_token_layer(self) -> float:
        n = self.token_layers
        return (self.bytes_sent + self.bytes_received) / n if n else 0.0
