"""The router's OpenAPI document, served at GET /openapi.json.

The handlers read their bodies themselves (size cap first, then strict validation with
OpenAI-shaped errors), so FastAPI sees no body parameters; this module adds what it cannot infer:
each request body's JSON schema (from router.schemas, the models that validate it), the responses
each route gives (the OpenAI error object on every failure, Retry-After on 429 and 503), and bearer
authentication when API keys are on. Clients and fuzzers take the API's shape from here.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from router.schemas import ChatCompletionRequest, CompletionRequest

REF = "#/components/schemas/{model}"

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string", "minLength": 1},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before retrying.",
        "required": True,
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    }
}
_USAGE = {
    "type": "object",
    "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
    "properties": {
        "prompt_tokens": {"type": "integer", "minimum": 0},
        "completion_tokens": {"type": "integer", "minimum": 0},
        "total_tokens": {"type": "integer", "minimum": 0},
    },
}


# With `return_token_ids` only (vLLM's places: a completion choice's, a chat's top level).
_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}}


def _completion(obj: str, choice: dict, extra: dict | None = None) -> dict:
    return {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices", "usage"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": obj},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {"type": "array", "items": choice},
            "usage": {"$ref": "#/components/schemas/Usage"},
            **(extra or {}),
        },
    }


def _choice(required: str, extra: dict) -> dict:
    return {
        "type": "object",
        "required": ["index", "finish_reason", required],
        "properties": {"index": {"type": "integer", "minimum": 0}, "token_ids": _IDS, **extra},
    }


_TEXT_CHOICE = _choice("text", {"prompt_token_ids": _IDS})
_CHAT_CHOICE = _choice("message", {})
_MODELS = {
    "type": "object",
    "required": ["object", "data"],
    "properties": {
        "object": {"const": "list"},
        "data": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["id", "object", "created", "owned_by", "max_model_len"],
                "properties": {"id": {"type": "string"}, "max_model_len": {"type": "integer"}},
            },
        },
    },
}
# One server-sent event (OpenAPI before 3.2: `schema` describes each event of a stream).
_EVENT = {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}
_HEALTH = {
    "type": "object",
    "required": ["status"],
    "properties": {"status": {"enum": ["ok", "degraded", "unavailable"]}},
}


def _error(description: str, retry: bool = False) -> dict:
    out: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    if retry:
        out["headers"] = _RETRY_AFTER
    return out


def _ok(schema: dict | None, media: str = "application/json", stream: bool = False) -> dict:
    content: dict[str, Any] = {media: {"schema": schema or {"type": "string"}}}
    if stream:  # `stream: true`: server-sent events, `data: <chunk JSON>`, then `data: [DONE]`
        content["text/event-stream"] = {"schema": _EVENT}
    return {"description": "OK", "content": content}


def _generate_responses(auth: bool, ok: dict) -> dict:
    out = {
        "200": ok,
        "400": _error("The request is invalid; `param` names the argument."),
        "404": _error("The model is not served here."),
        "413": _error("The body is larger than the router accepts."),
        "429": _error("Over a tenant's or the router's admission limits.", retry=True),
        "503": _error("No replica can serve the model now (none up, or draining).", True),
    }
    if auth:
        out["401"] = _error("Missing or wrong API key.")
    return dict(sorted(out.items()))


def _body(model: type[BaseModel] | str) -> dict:
    name = model if isinstance(model, str) else model.__name__
    schema = {"$ref": REF.format(model=name)}
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def document(app: FastAPI, auth: bool) -> dict:
    """The app's OpenAPI document: its routes as FastAPI lists them, with request bodies,
    responses and security filled in for the routes this module knows."""
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
    paths = doc.setdefault("paths", {})
    models: list[type[BaseModel]] = [CompletionRequest, ChatCompletionRequest]
    if "/v1/feedback" in paths:
        from router.iccache.http import FeedbackRequest

        models.append(FeedbackRequest)
    _, defs = models_json_schema([(m, "validation") for m in models], ref_template=REF)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(defs.get("$defs", {}))
    schemas.update(
        Error=_ERROR,
        Usage=_USAGE,
        Completion=_completion("text_completion", _TEXT_CHOICE),
        ChatCompletion=_completion("chat.completion", _CHAT_CHOICE, {"prompt_token_ids": _IDS}),
    )
    security = [{"bearer": []}] if auth else []
    if auth:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    posts = {
        "/v1/completions": (CompletionRequest, "Completion", True),
        "/v1/chat/completions": (ChatCompletionRequest, "ChatCompletion", True),
        "/v1/feedback": ("FeedbackRequest", None, False),
    }
    for path, (model, answer, stream) in posts.items():
        op = paths.get(path, {}).get("post")
        if op is None:
            continue
        op["requestBody"] = _body(model)
        answer_schema = {"$ref": REF.format(model=answer)} if answer else {"type": "object"}
        ok = _ok(answer_schema, stream=stream)
        op["responses"] = _generate_responses(auth, ok)
        op["security"] = security
    if "/v1/feedback" in paths:
        answers = paths["/v1/feedback"]["post"]["responses"]
        answers["404"] = _error("No IC-Cache response of the caller's awaits feedback by this id.")
    if "/v1/models" in paths:
        responses = {"200": _ok(_MODELS)}
        if auth:
            responses["401"] = _error("Missing or wrong API key.")
        paths["/v1/models"]["get"].update(responses=responses, security=security)
    if "/health" in paths:
        health = {"description": "Whether requests can be served.",
                  "content": {"application/json": {"schema": _HEALTH}}}  # fmt: skip
        paths["/health"]["get"]["responses"] = {
            "200": health, "503": {**health, "headers": _RETRY_AFTER}}  # fmt: skip
    if "/metrics" in paths:
        paths["/metrics"]["get"]["responses"] = {"200": _ok(None, "text/plain")}
    return doc


def install(app: FastAPI, auth: bool) -> None:
    """Serve the document at /openapi.json (built on first request, then kept)."""
    cache: dict[str, dict] = {}

    def openapi() -> dict:
        if "doc" not in cache:
            cache["doc"] = document(app, auth)
        return cache["doc"]

    app.openapi = openapi  # type: ignore[method-assign]
