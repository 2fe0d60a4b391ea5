"""Generated ids: one place decides their prefixes and lengths (OpenAI's look: `chatcmpl-…`, `call_…`)."""

from __future__ import annotations

import uuid


def request_id(prefix: str = "chatcmpl") -> str:
    """A request's id, e.g. chatcmpl-<32 hex>; a surface passes its own prefix (msg, resp, cmpl)."""
    return f"{prefix}-{uuid.uuid4().hex}"


def call_id() -> str:
    """A tool call's id: call_<24 hex>."""
    return "call_" + uuid.uuid4().hex[:24]


def choice_id(request_id: str, choice: int) -> str:
    """An engine request's id: one per choice of a request, unique even when a request id repeats."""
    return f"{request_id}-{choice}-{uuid.uuid4().hex[:6]}"
