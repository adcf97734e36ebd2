"""IC-Cache at the gRPC edge: a Generate request naming an IC-Cache route (chat messages only:
the examples are chosen by the messages' text) becomes a request to the model the bandit
picked, examples prepended as earlier turns. The initial metadata says who answers, with how
many examples, and the response id that `POST /v1/feedback` takes; once the stream ends the
decision is kept for that feedback and a complete large-model answer offered for admission."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import grpc
from redis.exceptions import RedisError

from protos.splitserve.v1 import generate_pb2 as pb
from router.iccache.cache import Decision, ICCache
from router.iccache.embed_client import EmbedUnavailableError
from router.iccache.http import EXAMPLES_HEADER, MODEL_HEADER

RESPONSE_ID_HEADER = "x-splitserve-response-id"
log = logging.getLogger(__name__)


class Refusal(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


@dataclass
class Answer:
    """What the stream carried, for admission once it ends."""

    decision: Decision
    response_id: str
    pieces: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0

    def add(self, msg: pb.GenerateResponse) -> None:
        self.pieces.append(msg.text)
        if msg.finish_reason:
            self.finish_reason = msg.finish_reason
        if msg.HasField("usage"):
            self.completion_tokens = msg.usage.completion_tokens

    async def finish(self, ic: ICCache) -> None:
        """The answer has reached the client by now: a failure here (Redis away) costs its
        feedback record and admission, never the call's status."""
        try:
            await ic.finish(self.decision, self.response_id, "".join(self.pieces),
                            self.finish_reason, self.completion_tokens)  # fmt: skip
        except Exception as e:
            log.warning("IC-Cache kept no record of %s: %s", self.response_id, e)


async def decide(
    ic: ICCache, request: pb.GenerateRequest, tenant: str
) -> tuple[pb.GenerateRequest, Decision]:
    """The request rewritten for the chosen model, and the decision; Refusal for what the route
    cannot serve."""
    route = ic.route(request.model)
    assert route is not None
    if request.WhichOneof("input") != "chat":
        raise Refusal(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"The IC-Cache route `{request.model}` takes chat messages (GenerateRequest.chat): "
            "its examples are chosen by the messages' text",
        )
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.content}
                for m in request.chat.messages]  # fmt: skip
    try:
        d = await ic.decide(route, tenant, messages)
    except EmbedUnavailableError as e:
        raise Refusal(grpc.StatusCode.UNAVAILABLE, str(e)) from None
    except ValueError as e:
        raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
    except RedisError as e:
        raise Refusal(grpc.StatusCode.UNAVAILABLE, f"IC-Cache's store is away: {e}") from None
    new = pb.GenerateRequest()
    new.CopyFrom(request)
    new.model = d.model
    del new.chat.messages[:]
    for m in d.messages(messages):
        new.chat.messages.add(role=m["role"], content=m["content"])
    return new, d


def metadata(d: Decision, response_id: str) -> tuple[tuple[str, str], ...]:
    return ((MODEL_HEADER, d.model), (EXAMPLES_HEADER, str(len(d.examples))),
            (RESPONSE_ID_HEADER, response_id))  # fmt: skip
