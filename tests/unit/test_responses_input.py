"""`api/responses.py: prepare` over arbitrary JSON input items and tools: it either builds a request or raises
the domain error (a 400 naming a field), never anything else (which the app would answer with a 500)."""

from __future__ import annotations

import os
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from flashserve.api.responses import prepare
from flashserve.api.responses_schemas import ResponsesRequest
from flashserve.errors import FlashserveError
from flashserve.server_key import ServerKey

KEY = ServerKey(os.urandom(32), "test")
_scalars = st.none() | st.booleans() | st.integers() | st.text(max_size=8)
_json = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=12)
_types = st.sampled_from(["message", "function_call", "function_call_output", "reasoning", "input_text",
                          "output_text", "input_image", "summary_text", "namespace", "function", "web_search"])
_keys = st.sampled_from(["type", "role", "content", "text", "call_id", "name", "arguments", "output", "summary",
                         "encrypted_content", "namespace", "tools", "parameters"])
_values = _types | st.sampled_from(["user", "assistant", "developer", "system", "tool"]) | _json
_obj = st.recursive(st.dictionaries(_keys, _values, max_size=5),
                    lambda inner: st.dictionaries(_keys, _values | inner | st.lists(inner, max_size=3), max_size=5),
                    max_leaves=10)


@settings(max_examples=150, deadline=None)
@given(items=st.lists(_obj, max_size=5), tools=st.lists(_obj, max_size=3),
       choice=st.none() | st.sampled_from(["auto", "none", "required"]) | _obj)
def test_prepare_raises_only_domain_errors(items: list[dict[str, Any]], tools: list[dict[str, Any]],
                                           choice: Any) -> None:
    body = ResponsesRequest(model="m", input=items, tools=tools, tool_choice=choice)
    try:
        prepare(body, KEY, "acct", [])
    except FlashserveError as exc:
        assert exc.status == 400 and exc.message
