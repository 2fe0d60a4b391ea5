"""The Anthropic adapter's pure mappings (`api/anthropic.py`, `api/errors.py: anthropic_body`), without an
app: model names, thinking and tool_choice onto the internal request, clear-thinking edits, tool results,
the error rendering, and the stop string a matcher reports."""

from __future__ import annotations

import os

import pytest

from flashserve.api.anthropic import catalog_model, generation_request, tool_use_id, usage_dict
from flashserve.api.anthropic_schemas import CountTokensRequest, MessagesRequest
from flashserve.api.errors import anthropic_body, render_anthropic
from flashserve.backends.remote import estimate_tokens
from flashserve.chat.output import StopStringMatcher
from flashserve.errors import FlashserveError, invalid_request
from flashserve.generation import Usage
from flashserve.server_key import ServerKey

KEY = ServerKey(os.urandom(32), "test")
MAP = {"claude-haiku-*": "small", "claude-*": "deepseek/deepseek-v4-flash"}


def gen(**body: object):  # type: ignore[no-untyped-def]
    fields = {"model": "claude-x", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}], **body}
    return generation_request(MessagesRequest.model_validate(fields), KEY, "acct", MAP)


def test_model_names() -> None:
    assert catalog_model("claude-haiku-5", MAP) == "small"
    assert catalog_model("claude-opus-5-5", MAP) == "deepseek/deepseek-v4-flash"
    assert catalog_model("deepseek-chat", MAP) == "deepseek-chat"


@pytest.mark.parametrize(("thinking", "effort", "expected"), [
    (None, None, (None, None, None)),
    (None, "low", ("low", None, None)),
    ({"type": "adaptive"}, "max", ("max", True, None)),
    ({"type": "enabled", "budget_tokens": 2000}, None, (None, True, 2000)),
    ({"type": "disabled"}, "high", ("none", False, None)),
])
def test_thinking_and_effort(thinking: object, effort: str | None, expected: tuple[object, ...]) -> None:
    body: dict[str, object] = {}
    if thinking is not None:
        body["thinking"] = thinking
    if effort is not None:
        body["output_config"] = {"effort": effort}
    r = gen(**body)[0].reasoning
    assert (r.effort, r.thinking, r.budget_tokens) == expected


def test_tool_choice_modes() -> None:
    tools = [{"name": "T", "input_schema": {"type": "object"}}]
    assert gen(tools=tools)[0].tool_choice is None
    for kind, mode in (("auto", "auto"), ("any", "required"), ("none", "none")):
        choice = gen(tools=tools, tool_choice={"type": kind})[0].tool_choice
        assert choice is not None and choice.mode == mode
    named = gen(tools=tools, tool_choice={"type": "tool", "name": "T"})[0].tool_choice
    assert named is not None and (named.mode, named.name) == ("named", "T")


def test_tool_result_must_answer_a_call() -> None:
    result = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "x"}]}
    with pytest.raises(FlashserveError) as caught:
        gen(messages=[{"role": "user", "content": "q"}, result])
    assert caught.value.status == 400 and "toolu_1" in caught.value.message
    call = {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "T", "input": {}}]}
    messages = gen(messages=[{"role": "user", "content": "q"}, call, result])[0].messages
    assert [m.role for m in messages] == ["user", "assistant", "tool"]
    assert messages[1].content is None and messages[2].content == "x"


def test_tool_result_error_and_text_order() -> None:
    call = {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "T", "input": {}}]}
    turn = {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "boom"}],
         "is_error": True},
        {"type": "text", "text": "and then?"}]}
    messages = gen(messages=[{"role": "user", "content": "q"}, call, turn])[0].messages
    assert [(m.role, m.content) for m in messages[2:]] == [("tool", "Error: boom"), ("user", "and then?")]


def test_count_tokens_body_has_no_sampling() -> None:
    body = CountTokensRequest.model_validate({"model": "claude-x", "messages": [{"role": "user", "content": "hi"}]})
    request, dropped = generation_request(body, KEY, "acct", MAP)
    assert request.sampling.max_tokens is None and dropped == []


def test_ids_and_usage() -> None:
    assert tool_use_id("call_abc") == "toolu_abc" and tool_use_id("toolu_x") == "toolu_x"
    assert usage_dict(Usage(prompt_tokens=10, cached_tokens=4, completion_tokens=3)) == {
        "input_tokens": 6, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 4, "output_tokens": 3}


def test_error_rendering() -> None:
    overflow = invalid_request("This model's maximum context length is 8192 tokens. However, your messages resulted "
                               "in 12199 tokens. Please reduce the length of the messages.", "messages",
                               "context_length_exceeded")
    assert anthropic_body(overflow)["error"] == {"type": "invalid_request_error",
                                                 "message": "prompt is too long: 12199 tokens > 8192 maximum"}
    status, body, _ = render_anthropic(FlashserveError(503, "busy", "server_error"))
    assert status == 529 and body["error"]["type"] == "overloaded_error"
    for code, kind in ((401, "authentication_error"), (402, "billing_error"), (404, "not_found_error"),
                       (413, "request_too_large"), (429, "rate_limit_error"), (500, "api_error"), (502, "api_error")):
        assert render_anthropic(FlashserveError(code, "x"))[1]["error"]["type"] == kind


def test_stop_matcher_reports_the_earliest_match() -> None:
    matcher = StopStringMatcher(["zz", "b"])
    assert matcher.feed("aab zz") == "aa" and matcher.matched == "b"


def test_remote_estimate() -> None:
    request = gen(messages=[{"role": "user", "content": "x" * 400}])[0]
    assert estimate_tokens(request) == 100 + 4
