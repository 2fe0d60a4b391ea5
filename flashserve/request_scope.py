"""What one HTTP request is, for everything that logs or counts it: its `x-request-id`, account, key,
model, outcome; and the log formats that print it.

`api/app.py: _RequestIds` opens a `RequestScope` per request and puts it in a context variable, so every
log line written while the request is handled (in its task, or in tasks and threads started from it)
carries the request id without anyone passing it along: `ScopeFilter` copies it onto each record.
The core fills in the account, key, model, tokens and cost as it learns them, and the middleware writes
one summary line (`request done`) and counts the request (`metrics.REQUESTS`) when the response ends.

Request ids: a client's `x-request-id` is kept when it is well-formed (`accept_request_id`: 1 to
`MAX_REQUEST_ID_CHARS` characters from a safe set, so it can go in a header, a log line and a database
column as it is); otherwise one is generated, a UUID (the form every upstream accepts). It is the
correlation id of the request, never an object id: completions, messages and responses get their own
server-generated ids (`ids.py`).

Log formats (`FLASHSERVE_LOG_FORMAT`): `text` (the default) or `json`, one object per line with `time`,
`level`, `logger`, `message` and, inside a request, `request_id`, `account`, `key_id`, `model`; the
summary line adds `status`, `code`, `prompt_tokens`, `cached_tokens`, `completion_tokens`, `cost_usd`,
`latency_ms`. No prompt, completion or key is ever a field: records carry only what is set here.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime

REQUEST_ID_HEADER = "x-request-id"
MAX_REQUEST_ID_CHARS = 128
_SAFE_ID = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._:=+/-]{{0,{MAX_REQUEST_ID_CHARS - 1}}}")
LOG_FORMATS = ("text", "json")


def new_request_id() -> str:
    return str(uuid.uuid4())


def accept_request_id(value: str | None) -> str:
    """The client's id when it is well-formed, else a new one."""
    if value is not None and _SAFE_ID.fullmatch(value):
        return value
    return new_request_id()


def as_uuid(request_id: str) -> str:
    """The request id in UUID form, for upstreams that accept nothing else (llama.cpp's server): itself when
    it is one, else a name-based UUID of it (stable, so the two can be matched in logs)."""
    try:
        return str(uuid.UUID(request_id))
    except ValueError:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, "flashserve:" + request_id))


@dataclass(slots=True)
class RequestScope:
    request_id: str
    surface: str = "other"
    started: float = field(default_factory=time.monotonic)
    account: str | None = None
    key_id: str | None = None
    model: str | None = None
    code: str | None = None  # our error code, when the request failed (in-band errors of a stream too)
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    completion_tokens: int | None = None
    cost_usd: str | None = None

    def summary(self, status: int) -> dict[str, object]:
        fields = {"status": status, "code": self.code, "prompt_tokens": self.prompt_tokens,
                  "cached_tokens": self.cached_tokens, "completion_tokens": self.completion_tokens,
                  "cost_usd": self.cost_usd, "latency_ms": int((time.monotonic() - self.started) * 1000)}
        return {k: v for k, v in fields.items() if v is not None}


CURRENT: ContextVar[RequestScope | None] = ContextVar("flashserve_request", default=None)


def current() -> RequestScope | None:
    return CURRENT.get()


class ScopeFilter(logging.Filter):
    """Puts the current request's id, account, key id and model on every record (as attributes)."""

    def filter(self, record: logging.LogRecord) -> bool:
        scope = CURRENT.get()
        if scope is not None and not hasattr(record, "request_id"):
            record.request_id = scope.request_id
            record.account = scope.account
            record.key_id = scope.key_id
            record.model = scope.model
        return True


_RECORD_FIELDS = ("request_id", "account", "key_id", "model")
SUMMARY_FIELDS = ("status", "code", "prompt_tokens", "cached_tokens", "completion_tokens", "cost_usd",
                  "latency_ms")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the request's fields, an exception's text."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace(
                "+00:00", "Z"),
            "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage(),
        }
        for name in (*_RECORD_FIELDS, *SUMMARY_FIELDS):
            value = getattr(record, name, None)
            if value is not None:
                out[name] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """The plain format, with `[request id]` inside a request and the summary's fields as key=value."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        request_id = getattr(record, "request_id", None)
        if request_id:
            text += f" [{request_id}]"
        if hasattr(record, "status"):  # the summary line
            text += "".join(f" {k}={getattr(record, k)}" for k in ("account", "key_id", "model", *SUMMARY_FIELDS)
                            if getattr(record, k, None) is not None)
        return text


def configure_logging(level: str, fmt: str) -> None:
    """The root logger's one handler (stderr) in `fmt`, with the request scope on every record; uvicorn's
    loggers propagate to it (the server is started with log_config=None)."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {LOG_FORMATS}, not {fmt!r}")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(ScopeFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
