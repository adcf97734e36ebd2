"""Errors as the OpenAI API shapes them: a status and `{"error": {message, type, param, code}}`.

Every failure a client can cause is an APIError with a 4xx status; the service's own failures
are 5xx in the same shape, never a traceback. `from_exception` is the one place where engine,
gRPC and backend exceptions become HTTP statuses.
"""

from __future__ import annotations

import json
import logging

import grpc
import redis
from pydantic import ValidationError
from starlette.responses import Response

from services.engine.errors import EngineError

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1  # what a 429 or 503 tells the client to wait


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> Response:
        return Response(
            json.dumps(self.body()).encode(),
            self.status,
            self.headers,
            media_type="application/json",
        )


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def unsupported(param: str, what: str = "") -> APIError:
    return APIError(
        400,
        f"'{param}'{what} is not supported by this server",
        param=param,
        code="unsupported_parameter",
    )


def model_not_found(model: str) -> APIError:
    return APIError(
        404,
        f"The model `{model}` does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


def unauthorized(message: str) -> APIError:
    return APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def too_many_requests(message: str) -> APIError:
    return APIError(
        429,
        message,
        type="requests",
        code="rate_limit_exceeded",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


def unavailable(message: str) -> APIError:
    return APIError(503, message, type="server_error", headers={"Retry-After": str(RETRY_AFTER_S)})


def client_closed() -> APIError:
    """The client went away before its request was read (status 499, as nginx logs it: what
    the metrics count; no one receives it)."""
    return APIError(499, "the client closed the connection before sending the whole request")


def payload_too_large(limit: int) -> APIError:
    return APIError(
        413,
        f"request body is larger than {limit} bytes",
        code="request_too_large",
    )


# -- pydantic -> 400 -------------------------------------------------------------------------


def from_validation(
    e: ValidationError, fields: frozenset[str], descriptions: dict[str, str]
) -> APIError:
    """The first problem in a request body, named the way OpenAI names it (`messages[0].role`).

    fields: every argument name (pydantic's locations also hold union member tags);
    descriptions: what a union-typed argument should be ("a string or an array of strings"),
    since pydantic reports one error per union member and one message is clearer."""
    errs = e.errors(include_url=False, include_context=False, include_input=False)
    if errs[0]["type"] == "json_invalid":
        return bad_request(
            "We could not parse the JSON body of your request: "
            + errs[0]["msg"].removeprefix("Invalid JSON: ")
            + ". The body must be a JSON object (Content-Type: application/json).",
            code="invalid_json",
        )
    if not errs[0]["loc"]:
        return bad_request("The request body must be a JSON object.", code="invalid_type")
    params = [_param(x["loc"], fields) for x in errs]
    base = params[0]
    same = [i for i, p in enumerate(params) if p == base or p.startswith((base + "[", base + "."))]
    # One argument, several union members: a member that took the shape but not the value
    # ("too long", "missing type") says more than the members of the wrong type.
    pick = next((i for i in same if not errs[i]["type"].endswith("_type")), 0)
    kind, param, msg = errs[pick]["type"], params[pick], errs[pick]["msg"]
    if kind == "extra_forbidden":
        return bad_request(
            f"Unrecognized request argument supplied: {param}", param, "unknown_parameter"
        )
    if kind == "missing":
        return bad_request(f"Missing required parameter: '{param}'.", param, "missing_required")
    name = base.rsplit(".", 1)[-1].split("[", 1)[0]
    if kind.endswith("_type") and len(same) > 1 and name in descriptions:
        return bad_request(
            f"Invalid type for '{base}': expected {descriptions[name]}.", base, "invalid_type"
        )
    msg = msg.removeprefix("Value error, ")
    if kind.endswith("_type"):
        return bad_request(f"Invalid type for '{param}': {msg}.", param, "invalid_type")
    return bad_request(f"Invalid value for '{param}': {msg}.", param, "invalid_value")


def _param(loc: tuple, fields: frozenset[str]) -> str:
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif i == 0 or part in fields:
            out += f".{part}" if out else str(part)
    return out


# -- backend and engine exceptions -----------------------------------------------------------

_GRPC = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def from_exception(e: BaseException) -> APIError:
    """What the client sees for an exception out of the backend or the engine's validation."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, grpc.aio.AioRpcError):
        status = _GRPC.get(e.code(), 502)
        details = e.details() or e.code().name
        if status == 400:
            return bad_request(details, code="invalid_value")
        if status == 404:
            return APIError(404, details, code="model_not_found", param="model")
        if status == 429:
            return too_many_requests(details)
        if status == 503:
            return unavailable(f"a replica serving this model is unavailable: {details}")
        log.warning("backend failed: %s %s", e.code().name, details)
        return APIError(status, f"the serving backend failed: {details}", type="server_error")
    if isinstance(e, ValueError | EngineError):  # InvalidRequestError is both
        return bad_request(str(e), code="invalid_value")
    if isinstance(e, RuntimeError):  # the backend's "no replica is up" (NoReplicaError)
        return unavailable(str(e))
    if isinstance(e, redis.RedisError):  # the cluster's Redis (registry, fairness counters)
        log.warning("the cluster's Redis failed: %r", e)
        return unavailable(f"the cluster's Redis is unreachable, retry shortly: {e}")
    log.error("internal error", exc_info=e)
    return APIError(500, "internal server error", type="server_error")
