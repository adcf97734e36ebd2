"""What a runner keeps about each request between steps, built from SchedulerOutputs alone:
NewRequestData once, then each step's diff, plus the tokens the runner samples itself."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.engine.remote_kv import RemoteSegment
from services.engine.sampler import SamplingRow
from services.engine.sampling_params import SamplingParams
from services.engine.sched_output import NewRequestData, SchedulerOutput


@dataclass
class RequestState:
    """One request as the runner knows it."""

    prompt_token_ids: list[int]
    output_token_ids: list[int]  # known: given at admission or sampled and read back
    params: SamplingParams
    block_ids: list[int]
    # Sampled by a launched step whose results are not read yet (async scheduling on CUDA).
    num_pending: int = 0
    remote: list[RemoteSegment] = field(default_factory=list)  # blocks after block_ids

    @classmethod
    def from_new(cls, new: NewRequestData) -> RequestState:
        return cls(
            new.prompt_token_ids, list(new.output_token_ids), new.params, list(new.block_ids),
            remote=list(new.remote),
        )  # fmt: skip

    @property
    def num_tokens(self) -> int:
        """Tokens known to the runner (pending ones excluded)."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def tokens(self, start: int, end: int) -> list[int]:
        """Known token ids [start, end)."""
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p : end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - p]

    def sampling_row(self) -> SamplingRow:
        out = self.output_token_ids
        if self.num_pending:  # the sampled position counts the tokens still in flight
            out = [*out, *([-1] * self.num_pending)]
        return SamplingRow(self.params, self.prompt_token_ids, out)


class RequestStates:
    """The runner's requests by id, kept in step with the scheduler by update(so)."""

    def __init__(self) -> None:
        self._by_id: dict[str, RequestState] = {}

    def update(self, so: SchedulerOutput) -> None:
        """Apply a step's news before running it (the order SchedulerOutput states)."""
        for rid in so.finished_ids:
            self._by_id.pop(rid, None)
        for rid in so.preempted_ids:
            self._by_id.pop(rid, None)
        for new in so.new_requests:
            self._by_id[new.request_id] = RequestState.from_new(new)
        for s in so.seqs:
            if s.new_block_ids:
                self._by_id[s.request_id].block_ids += s.new_block_ids
            if s.new_remote:
                self._by_id[s.request_id].remote += s.new_remote

    def __getitem__(self, request_id: str) -> RequestState:
        return self._by_id[request_id]

    def ids(self) -> set[str]:
        return set(self._by_id)
