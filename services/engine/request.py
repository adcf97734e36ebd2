"""A request's state inside the engine, and what the engine reports back per step."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from services.engine.block_hash import BlockHash, hash_block, root_hash
from services.engine.kv_transfer import KVBlock
from services.engine.remote_kv import RemoteSegment
from services.engine.sampler import SampledToken
from services.engine.sampling_params import SamplingParams

MAX_PRIORITY = 255  # priorities are within [0, MAX_PRIORITY]; 0 runs first


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.StrEnum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context length
    ABORT = "abort"


@dataclass
class Request:
    """Token counts are the state: the scheduler computes tokens until num_computed_tokens
    catches up with num_tokens. A prefix-cache hit, KV imported from another engine and a
    chunk of prefill all just advance num_computed_tokens."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    block_size: int
    model_id: str
    cache_salt: str = ""  # the root of its block hashes (block_hash.root_hash): its cache scope
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    # Blocks lent by other holders, after block_ids in sequence order (DistAttention).
    remote: list[RemoteSegment] = field(default_factory=list)
    # Content hashes of the request's full blocks, extended as tokens arrive.
    block_hashes: list[BlockHash] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: FinishReason | None = None
    # KV that arrived from another engine, by block position (None: missing, recompute it).
    imported_kv: list[KVBlock | None] = field(default_factory=list)
    export_kv: bool = False
    priority: int = 0  # under the priority policy: lower is admitted first, preempted last
    max_len: int = 0  # the engine's context limit; output stops there
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    num_imported_tokens: int = 0  # prompt tokens whose KV arrived from outside
    num_preemptions: int = 0
    # Preempted by swapping: the KV of tokens [0, swapped_tokens) waits in host blocks (all
    # but the leading blocks the KV tier holds).
    swapped_tokens: int = 0
    # Leading full blocks the KV tier holds (services/engine/kv_tier.py): after a preemption
    # they are fetched back rather than swapped or recomputed; tier_fetched: since the last.
    stored_blocks: int = 0
    tier_fetched: bool = False
    # Tokens sampled by a step still running on the device (async scheduling): counted by the
    # scheduler as if known, appended when the step's results are read.
    num_pending_tokens: int = 0
    first_token_time: float | None = None
    scheduled_time: float | None = None  # when it first got a slot in a step (queueing ends)
    logprobs: list[SampledToken] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.update_hashes()

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_blocks(self) -> int:
        """Blocks the request holds, local and remote."""
        return len(self.block_ids) + sum(s.num_blocks for s in self.remote)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED

    def holds(self, pos: int, blk: KVBlock) -> bool:
        """Whether blk's tokens are this request's at block position pos: KV that arrived from
        elsewhere (imported, fetched from the tier) is used only where it is the request's own."""
        start = pos * self.block_size
        return list(blk.token_ids) == self.all_token_ids[start : start + blk.num_tokens]

    def update_hashes(self) -> None:
        """Hash every newly full block of tokens (prompt and output alike)."""
        bs = self.block_size
        tokens = None
        while (len(self.block_hashes) + 1) * bs <= self.num_tokens:
            tokens = tokens or self.all_token_ids
            i = len(self.block_hashes)
            parent = self.block_hashes[-1] if self.block_hashes else root_hash(self.cache_salt)
            self.block_hashes.append(
                hash_block(parent, tokens[i * bs : (i + 1) * bs], self.model_id)
            )


@dataclass(frozen=True)
class RequestOutput:
    """What one engine step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: FinishReason | None = None
    logprobs: list[SampledToken] = field(default_factory=list)  # one per new token if asked
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    kv_blocks: list[KVBlock] | None = None  # on finish, when the request asked for export
    queue_time_s: float = 0.0  # arrival to first scheduled step
    error: str | None = None  # ended by the engine, not by the model (e.g. it can never fit)


def stop_reason(req: Request, token: int, stopped: bool) -> FinishReason | None:
    """Why the request ends with this new token (stopped: a stop string matched), or None."""
    p = req.params
    if stopped or token in p.stop_token_ids:
        return FinishReason.STOP
    if not p.ignore_eos and token in p.eos_token_ids:
        return FinishReason.STOP
    if req.num_output_tokens >= p.max_tokens or req.num_tokens >= req.max_len:
        return FinishReason.LENGTH
    return None
