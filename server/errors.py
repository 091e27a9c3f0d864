"""Errors in OpenAI's shape `{"error": {"message", "type", "param", "code"}}` and their HTTP codes."""

from __future__ import annotations

import json
import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from headwise.engine.async_engine import EngineDead
from headwise.engine.errors import PromptTooLong, RequestFailed, UnknownPlan
from headwise.engine.sampling_params import InvalidRequest

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
}

# seconds a client should wait before retrying a 429 (a slot frees as soon as any request
# ends) or a 503 (loading, draining into a restart, or a dead engine being replaced)
RETRY_AFTER_S = {429: 1, 503: 5}

_UNION_TAG = re.compile(r"^(str|int|float|bool|none)$|[\[\-]")


class APIError(Exception):
    """Raised anywhere in a handler; rendered as the OpenAI error object with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = printable(message)
        self.param = None if param is None else printable(param)
        self.code = code
        self.headers = {**retry_after(status), **(headers or {})}

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": _TYPES.get(self.status, "server_error"),
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def retry_after(status: int) -> dict[str, str]:
    """`Retry-After` for the statuses a client may retry (429, 503); none for the others."""
    return {"Retry-After": str(RETRY_AFTER_S[status])} if status in RETRY_AFTER_S else {}


def printable(text: str) -> str:
    """`text` as valid UTF-8: a lone surrogate from a client's JSON (`"\\ud800"`) is shown
    escaped, so an error message that quotes it can still be sent."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def api_error(exc: BaseException) -> APIError:
    """Map an engine or handler exception to its API error; anything unexpected is a 500."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, RequestFailed):
        return APIError(500, f"the engine failed this request: {exc.error}", None, "request_failed")
    if isinstance(exc, EngineDead):
        return APIError(500, str(exc), None, "engine_dead")
    if isinstance(exc, UnknownPlan):
        return APIError(404, str(exc), exc.param or "kv_plan", "plan_not_found")
    if isinstance(exc, PromptTooLong):
        return APIError(400, str(exc), exc.param or "messages", "context_length_exceeded")
    if isinstance(exc, InvalidRequest):
        return APIError(400, str(exc), exc.param, exc.code)
    log.error("engine fault", exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", None, "internal_error")


def validation_error(exc: RequestValidationError) -> APIError:
    """Pydantic's first complaint as one message; `param` is the field path inside the body."""
    errors = exc.errors()
    if not errors:
        return APIError(400, "invalid request body", None, "invalid_request")
    # the longest location is the most specific complaint (inside a union, the member that got furthest)
    # and among equals, a member of the right type that broke a bound over one of the wrong type
    first = max(errors, key=lambda e: (len(e.get("loc", ())), not str(e.get("type", "")).endswith("_type")))
    loc = []
    for part in first.get("loc", ())[1:] if first.get("loc", ())[:1] == ("body",) else first.get("loc", ()):
        if isinstance(part, str) and _UNION_TAG.search(part):
            break  # pydantic names the union member tried (`str`, `list[int]`); not a field
        loc.append(str(part))
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return APIError(
            400,
            f"request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}",
            None,
            "invalid_json",
        )
    given = first.get("input")
    shown = json.dumps(given)[:80] if _jsonable(given) else repr(given)[:80]
    message = f"{param or 'body'}: {first['msg']} (got {shown})"
    if len(errors) > 1:
        message += f"; and {len(errors) - 1} more error(s)"
    return APIError(400, message, param, first.get("type"))


def http_error(request: Request, exc: HTTPException) -> APIError:
    """Starlette's and FastAPI's own errors with a code, and their headers (405's `Allow`)."""
    headers = dict(exc.headers or {})
    if exc.status_code == 400:  # FastAPI could not decode the body: invalid UTF-8, nesting too deep for json
        message = "request body is not valid JSON: it could not be decoded (invalid UTF-8 or nested too deeply)"
        return APIError(400, message, None, "invalid_json", headers)
    if exc.status_code == 405:
        allowed = headers.get("Allow", "")
        return APIError(
            405,
            f"method {request.method} is not allowed on {request.url.path}; allowed: {allowed}",
            None,
            "method_not_allowed",
            headers,
        )
    if exc.status_code == 404:
        return APIError(404, f"no route {request.url.path}", None, "not_found", headers)
    return APIError(exc.status_code, str(exc.detail), None, f"http_{exc.status_code}", headers)


def _jsonable(value: object) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    # engine errors get their own handlers: the catch-all below runs in Starlette's
    # outermost middleware, which re-raises after answering (a second traceback in the log)
    @app.exception_handler(InvalidRequest)
    @app.exception_handler(RequestFailed)
    @app.exception_handler(EngineDead)
    async def _engine(request: Request, exc: Exception) -> JSONResponse:
        return api_error(exc).response()

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        return http_error(request, exc).response()

    @app.exception_handler(Exception)
    async def _fault(request: Request, exc: Exception) -> JSONResponse:
        return api_error(exc).response()
