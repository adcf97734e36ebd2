"""IC-Cache at the HTTP edge: an IC-Cache route's request becomes a request to the model the
bandit picked (examples prepended); the response says who answered and with how many
examples (header `x-splitserve-model`, `x-splitserve-examples`, and `usage.iccache`); and
`POST /v1/feedback` takes a judged score in [0, 1] for a response id."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from router.errors import APIError, bad_request, from_validation, model_not_found
from router.iccache.cache import Decision, ICCache, UnknownResponseError
from router.iccache.embed_client import EmbedUnavailableError
from router.schemas import ChatCompletionRequest, ChatMessage, CompletionRequest

MODEL_HEADER = "x-splitserve-model"
EXAMPLES_HEADER = "x-splitserve-examples"


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    id: str = Field(min_length=1, max_length=256)
    score: float = Field(ge=0.0, le=1.0)


async def decide(
    ic: ICCache, kind: str, req: CompletionRequest | ChatCompletionRequest, tenant: str
) -> tuple[ChatCompletionRequest, Decision]:
    route = ic.route(req.model)
    assert route is not None
    if not route.allows(tenant):
        raise model_not_found(req.model)
    if kind != "chat" or not isinstance(req, ChatCompletionRequest):
        raise bad_request(
            f"The IC-Cache route `{req.model}` serves chat completions only "
            "(POST /v1/chat/completions).",
            "model",
        )
    if req.n != 1:
        raise bad_request(f"The IC-Cache route `{req.model}` answers with n=1 only.", "n")
    messages = []
    for i, m in enumerate(req.messages):
        if m.non_text_part() is not None:
            raise bad_request("IC-Cache routes take text content only.", f"messages[{i}]")
        messages.append({"role": "system" if m.role == "developer" else m.role,
                         "content": m.text()})  # fmt: skip
    try:
        d = await ic.decide(route, tenant, messages)
    except EmbedUnavailableError as e:
        raise APIError(503, str(e), type="server_error", headers={"Retry-After": "1"}) from None
    except ValueError as e:
        raise bad_request(str(e), "messages") from None
    sent = [ChatMessage(role=m["role"], content=m["content"]) for m in d.messages(messages)]
    new = req.model_copy(update={"model": d.model, "messages": sent})
    return new, d


def headers(d: Decision) -> dict[str, str]:
    return {MODEL_HEADER: d.model, EXAMPLES_HEADER: str(len(d.examples))}


async def finish(ic: ICCache, d: Decision, body: dict) -> dict:
    """The response body with usage.iccache; the decision kept for feedback; a large-model
    answer offered for admission."""
    choice = body["choices"][0]
    text = choice["message"]["content"] if "message" in choice else choice.get("text", "")
    await ic.finish(
        d, body["id"], text, choice.get("finish_reason"), body["usage"]["completion_tokens"]
    )
    body["usage"]["iccache"] = d.usage()
    return body


async def feedback(ic: ICCache, body: bytes, tenant: str) -> dict:
    try:
        fb = FeedbackRequest.model_validate_json(body)
    except ValidationError as e:
        raise from_validation(e, frozenset({"id", "score"}), {}) from None
    try:
        result = await ic.feedback(tenant, fb.id, fb.score)
    except UnknownResponseError:
        raise APIError(
            404,
            f"No response `{fb.id}` awaits feedback (unknown, expired, already judged, or "
            "not an IC-Cache response of yours).",
            param="id",
            code="response_not_found",
        ) from None
    return {"object": "feedback", "id": fb.id, "score": fb.score, **result}
