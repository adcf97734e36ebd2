"""Request migration: a request whose replica is lost (killed, restarting, drained) continues on
another one from its prompt plus the tokens already delivered.

The stream the caller reads goes on as if nothing happened: the new replica is told which
tokens were delivered (DecodeRequest.resume_token_ids) and streams only what follows, so no
token is repeated or missing. It is the same tokens as an uninterrupted run: greedy decoding
depends on the tokens alone, a seeded draw on (seed, output position) alone, penalties on the
tokens the engine is given, and the detokenizer replays the delivered tokens, so text held back
for a possible stop string comes out once, where it would have. The prompt's KV comes from the
KV store where the prefill left it, and is recomputed where it is gone; the delivered tokens' KV
is recomputed.

What counts as a loss: the replica's stream failed with a transport-level status (UNAVAILABLE,
CANCELLED by the server, UNKNOWN, INTERNAL, ABORTED) or ended without a finish reason; once
tokens were delivered, also RESOURCE_EXHAUSTED (too late for a 429; another replica may have
room). A request that cannot continue (no replica left to take it within `wait_s`, or
`max_resumes` resumptions spent) ends with ResumeFailedError, which the HTTP API sends as an
error event and the gRPC API as UNAVAILABLE, both saying what happened.

Accounting: usage counts the whole completion once (the finishing replica counts the delivered
tokens among its output). A tenant's fair-share counter (router.vtc) is charged the prompt once,
at admission, and each token once, as it is delivered: what a resumption recomputes is the
system's cost, not the tenant's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc

from router.pd_client import Call, Handoff
from rpc.piece import Piece

# Statuses that say the replica (or the way to it) failed, not the request.
LOSS_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.ABORTED,
    }
)


class LostStreamError(RuntimeError):
    """A replica's stream ended without a finish reason."""


class ResumeFailedError(RuntimeError):
    """The replica serving a request was lost and no other could continue it (HTTP 503 /
    gRPC UNAVAILABLE)."""


@dataclass
class Migration:
    """One request's way through its replicas: what was delivered, which replicas it lost,
    where it is served now, and the prefill's hand-off (a resumed decode pulls the same KV)."""

    call: Call
    max_resumes: int
    delivered: list[int] = field(default_factory=list)
    lost: set[str] = field(default_factory=set)  # replica ids
    resumes: int = 0
    serving: str = ""  # the replica id the current hop runs on
    role: str = ""
    handoff: Handoff | None = None

    def deliver(self, piece: Piece) -> None:
        self.delivered += piece.token_ids

    def attempt_call(self) -> Call:
        """The request as this attempt sends it: a fresh request id per attempt, so a
        replica that still knows an earlier attempt's id never confuses the two."""
        if not self.resumes:
            return self.call
        c = self.call
        rid = f"{c.request_id}-r{self.resumes}"
        return Call(c.prompt_ids, c.params, rid, c.tenant, c.priority, c.cache_salt)

    def is_loss(self, e: BaseException) -> bool:
        if isinstance(e, LostStreamError):
            return True
        if not isinstance(e, grpc.aio.AioRpcError):
            return False
        code = e.code()
        return code in LOSS_CODES or (
            code == grpc.StatusCode.RESOURCE_EXHAUSTED and bool(self.delivered)
        )

    def lose(self, e: BaseException) -> None:
        """The serving replica failed with e: mark it lost and allow one more attempt, or
        raise (e itself when it is not a loss; ResumeFailedError when attempts are spent)."""
        if not self.is_loss(e):
            raise e
        self.lost.add(self.serving)
        if self.resumes >= self.max_resumes:
            raise self.failed(f"it was lost {self.resumes + 1} times", e) from e
        self.resumes += 1

    def failed(self, why: str, e: BaseException | None = None) -> ResumeFailedError:
        detail = f" (last error: {describe(e)})" if e is not None else ""
        return ResumeFailedError(
            f"the {self.role} replica serving this request was lost after "
            f"{len(self.delivered)} tokens and the request could not be resumed: {why}{detail}"
        )


def describe(e: BaseException) -> str:
    if isinstance(e, grpc.aio.AioRpcError):
        return f"{e.code().name}: {e.details()}"
    return str(e)
