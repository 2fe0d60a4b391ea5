"""Generated ids: one place decides their prefixes and lengths (OpenAI's look: `chatcmpl-…`, `call_…`)."""

from __future__ import annotations

import uuid

# Surfaces whose object ids are `prefix_…` (Anthropic's `msg_…`, OpenAI's `resp_…`): the request id is the
# object's id itself, so the `x-request-id` header, the body's `id` and the usage row all read the same.
_UNDERSCORE_PREFIXES = frozenset({"msg", "resp"})


def request_id(prefix: str = "chatcmpl") -> str:
    """A request's id, e.g. chatcmpl-<32 hex>, msg_<32 hex>; a surface passes its own prefix (msg, resp, cmpl)."""
    separator = "_" if prefix in _UNDERSCORE_PREFIXES else "-"
    return f"{prefix}{separator}{uuid.uuid4().hex}"


def call_id() -> str:
    """A tool call's id: call_<24 hex>."""
    return "call_" + uuid.uuid4().hex[:24]


def choice_id(request_id: str, choice: int) -> str:
    """An engine request's id: one per choice of a request, unique even when a request id repeats."""
    return f"{request_id}-{choice}-{uuid.uuid4().hex[:6]}"
