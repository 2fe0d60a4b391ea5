"""OpenAI's rendering of the domain error, and the handlers that turn every failure into one.

Any layer raises `flashserve/errors.py: FlashserveError`; the app's handlers render it as
`{"error": {"message", "type", "param", "code"}}` with its status. Request
validation failures become 400s naming the offending `param`; anything
unexpected becomes a 500 whose message leaks no internals.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from flashserve import request_scope
from flashserve.errors import (
    AUTHENTICATION,
    INVALID_REQUEST,
    NOT_FOUND,
    RATE_LIMIT,
    SERVER_ERROR,
    FlashserveError,
    invalid_request,
)

log = logging.getLogger(__name__)



def openai_body(error: FlashserveError) -> dict[str, Any]:
    """The error as OpenAI's object (also the in-band error event of a stream)."""
    return {"error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}}


def render_openai(error: FlashserveError) -> tuple[int, dict[str, Any], dict[str, str]]:
    """OpenAI's rendering of a domain error: (status, body, headers). Another surface (Anthropic's
    `{"type": "error", "error": {"type", "message"}}`) is a sibling function of the same shape."""
    return error.status, openai_body(error), error.headers


def openai_response(error: FlashserveError) -> JSONResponse:
    status, body, headers = render_openai(error)
    return JSONResponse(body, status_code=status, headers=headers)


# -- Anthropic's rendering (the Messages API: /v1/messages..., /anthropic/...) -----------------------------
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
                    403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                    429: "rate_limit_error", 503: "overloaded_error", 529: "overloaded_error"}
_CONTEXT = re.compile(r"maximum context length is (\d+) tokens\. However, your messages resulted in (\d+) tokens")


def is_anthropic_path(path: str) -> bool:
    return path.startswith(("/anthropic/", "/v1/messages"))


def anthropic_body(error: FlashserveError) -> dict[str, Any]:
    """The error as Anthropic's object (also the in-band `error` event of a stream). A context overflow
    reads "prompt is too long: N tokens > M maximum", which Claude Code parses."""
    message = error.message
    match = _CONTEXT.search(message) if error.code == "context_length_exceeded" else None
    if match:
        message = f"prompt is too long: {match.group(2)} tokens > {match.group(1)} maximum"
    kind = _ANTHROPIC_TYPES.get(error.status, "api_error" if error.status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def render_anthropic(error: FlashserveError) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Anthropic's rendering: its error types, and 503 (overloaded, draining) as its 529 `overloaded_error`,
    which Anthropic's clients retry as overload."""
    status = 529 if error.status == 503 else error.status
    return status, anthropic_body(error), error.headers


def error_response(error: FlashserveError, path: str) -> JSONResponse:
    """The error in the shape of the surface that `path` belongs to (its code noted for the request's
    counter and summary log line)."""
    scope = request_scope.current()
    if scope is not None:
        scope.code = error.code or error.type
    render = render_anthropic if is_anthropic_path(path) else render_openai
    status, body, headers = render(error)
    return JSONResponse(body, status_code=status, headers=headers)


# -- pydantic validation errors -> one 400 ---------------------------------------
_TYPE_TAG = re.compile(r"^(str|int|float|bool|list|dict|none|function-.*|tagged-union.*|literal.*|[A-Z]\w*)$|[\[(]")
_CODE_BY_KIND = {
    "missing": "missing_required_parameter",
    "extra_forbidden": "unknown_parameter",
    "json_invalid": "invalid_json",
    "greater_than_equal": "invalid_value",
    "less_than_equal": "invalid_value",
    "greater_than": "invalid_value",
    "less_than": "invalid_value",
    "too_short": "invalid_value",
    "too_long": "invalid_value",
    "literal_error": "invalid_value",
    "string_too_short": "invalid_value",
    "value_error": "invalid_value",
}


def param_from_loc(loc: tuple[Any, ...]) -> str | None:
    """('body', 'messages', 0, 'content', 'str') -> 'messages[0].content'."""
    parts: list[str] = []
    for item in loc:
        if item == "body" and not parts:
            continue
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif not _TYPE_TAG.search(str(item)):
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or None


def _pick_error(errors: list[dict[str, Any]]) -> dict[str, Any]:
    """Unions report one error per member; the most specific (longest loc) reads best."""
    return max(errors, key=lambda e: (e["type"] not in ("string_type", "list_type", "dict_type"), len(e["loc"])))


def validation_error(errors: list[dict[str, Any]]) -> FlashserveError:
    err = _pick_error(errors)
    kind = err["type"]
    if kind == "json_invalid":
        return invalid_request("We could not parse the JSON body of your request. The body must be valid JSON.",
                               None, "invalid_json")
    param = param_from_loc(tuple(err["loc"]))
    if kind == "missing":
        message = f"Missing required parameter: '{param}'."
    elif kind == "extra_forbidden":
        message = f"Unrecognized request argument supplied: '{param}'."
    elif kind == "model_type" and param is None:
        message = "The request body must be a JSON object."
    else:
        detail = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        message = f"Invalid value for '{param}': {detail}." if param else f"Invalid request: {detail}."
    code = _CODE_BY_KIND.get(kind, "invalid_type" if kind.endswith("_type") else "invalid_value")
    return invalid_request(message, param, code)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(FlashserveError)
    async def _domain_error(request: Request, exc: FlashserveError) -> JSONResponse:
        return error_response(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(list(exc.errors())), request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kinds = {404: NOT_FOUND, 401: AUTHENTICATION, 429: RATE_LIMIT}
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = "Unknown request URL. Please check the URL and method."
        code = "unknown_url" if exc.status_code == 404 else None
        if exc.status_code == 405:
            code = "method_not_allowed"
        error = FlashserveError(exc.status_code, message, kinds.get(exc.status_code, INVALID_REQUEST), None, code)
        error.headers = dict(exc.headers or {})
        return error_response(error, request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(FlashserveError(500, "The server had an error while processing your request.",
                                              SERVER_ERROR), request.url.path)
