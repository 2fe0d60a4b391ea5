"""The domain error every layer raises, and its usual constructors.

A `FlashserveError` says what went wrong in terms every API surface can render: an HTTP-like status, a
message for the client, an error type, the offending parameter, a machine-readable code and extra
response headers (`retry-after`). It knows no wire format and imports no HTTP framework: `api/errors.py`
renders it as OpenAI's `{"error": {...}}`, and another surface (Anthropic's `{"type": "error", ...}`)
renders the same error its own way.
"""

from __future__ import annotations

# Error types, as OpenAI and DeepSeek name them; a surface with other names maps these.
INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
NOT_FOUND = "not_found_error"
RATE_LIMIT = "rate_limit_error"
SERVER_ERROR = "server_error"


class FlashserveError(Exception):
    def __init__(self, status: int, message: str, type: str = INVALID_REQUEST, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def __repr__(self) -> str:
        return f"FlashserveError({self.status}, {self.message!r}, code={self.code!r}, param={self.param!r})"


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> FlashserveError:
    return FlashserveError(400, message, INVALID_REQUEST, param, code)


def unsupported_parameter(param: str, why: str) -> FlashserveError:
    return FlashserveError(400, f"Unsupported parameter: '{param}' {why}", INVALID_REQUEST, param,
                           "unsupported_parameter")


def not_found(message: str, code: str, param: str | None = None) -> FlashserveError:
    return FlashserveError(404, message, NOT_FOUND, param, code)


def model_not_found(model_id: str) -> FlashserveError:
    return not_found(f"The model '{model_id}' does not exist or you do not have access to it.",
                     "model_not_found", "model")


def server_error(status: int, message: str, code: str, retry_after_s: int | None = None) -> FlashserveError:
    """A failure on our side or upstream (5xx); `retry_after_s` adds a retry-after header."""
    headers = {"retry-after": str(retry_after_s)} if retry_after_s is not None else None
    return FlashserveError(status, message, SERVER_ERROR, None, code, headers)


def rate_limited(message: str, code: str, retry_after: str) -> FlashserveError:
    return FlashserveError(429, message, RATE_LIMIT, None, code, headers={"retry-after": retry_after})
