"""The engine's seam to KV blocks held outside its own pool (Infinite-LLM's rManager view).

When the engine cannot hold a sequence's next blocks it borrows them from a creditor (an
attention replica) through a RemoteKV; from then on the sequence's KV is its local blocks (a
prefix of the sequence) followed by remote segments, and every step each holder attends the
sequence's queries over the blocks it holds (DistAttention), the decoder merging the partials.

The engine does no networking: the services give it a RemoteKV (services/attention_client.py
talks gRPC to attention replicas). Calls come from the engine's thread only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class RemoteSegment:
    """Logical blocks [first_block, first_block + num_blocks) of a sequence, held by holder_id."""

    holder_id: str
    first_block: int
    num_blocks: int
    # The holder's pool blocks, in logical order, where the holder told them (a holder whose
    # pool this engine can read in place: RemoteKV.in_place).
    phys: tuple[int, ...] = ()

    @property
    def end_block(self) -> int:
        return self.first_block + self.num_blocks


@dataclass(frozen=True)
class SeqSlice:
    """What one holder does for one sequence in a step: attend the queries at positions
    [q_start, q_start + num_q) over the blocks it holds, after writing the K/V of positions
    [write_start, write_start + num_write) (the step's tokens that fall in its blocks)."""

    seq_id: str
    q_start: int
    num_q: int
    write_start: int
    num_write: int


class HolderLostError(RuntimeError):
    """A holder stopped answering (it died, or its stream broke): the blocks it held are gone
    and the sequences that had them must be recomputed."""

    def __init__(self, holder_id: str, why: str = "") -> None:
        super().__init__(f"KV holder {holder_id} is lost{': ' + why if why else ''}")
        self.holder_id = holder_id


class PendingPartial(Protocol):
    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(out [n, H, D], lse [n, H]), float32, for the rows sent; raises HolderLostError."""
        ...


class RemoteKV(Protocol):
    def borrow(self, seq_id: str, first_block: int, num_blocks: int) -> RemoteSegment | None:
        """Reserve blocks on a creditor for logical blocks [first_block, +num_blocks) of
        seq_id; None when no creditor can lend them (the caller preempts instead)."""
        ...

    def release(self, seq_id: str) -> None:
        """Give back every block lent for seq_id (it finished, was aborted or preempted)."""
        ...

    def begin_step(self, holder_id: str, slices: list[SeqSlice]) -> None:
        """Announce a step's work on one holder; its layer batches follow in layer order."""
        ...

    def send_layer(
        self, holder_id: str, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> PendingPartial:
        """One layer batch of the current step: q [sum num_q, H, D] and the new k, v
        [sum num_write, Hkv, D], rows in the step's slice order. Returns at once."""
        ...

    def in_place(self, holder_id: str):
        """The holder's KV pool as a KVCache this engine reads and writes in place (same
        device), or None: attention over its blocks then goes through layer batches."""
        ...

    def reclaimed(self) -> list[str]:
        """Sequences whose creditors asked for their blocks back since the last call."""
        ...

    def lendable(self) -> int | None:
        """The most blocks the creditors could lend this engine, all idle (their caps); None
        when it can't be known now (the ledger is unreachable)."""
        ...
