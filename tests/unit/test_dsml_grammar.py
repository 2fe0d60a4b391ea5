"""The grammar that forces DeepSeek-V4 tool calls (DSML) agrees with the renderer and the parser: what
`render_tool_calls` writes is accepted, the streaming parser reads it back with typed arguments, and calls
the tools do not allow (unknown name, missing or mistyped parameter, raw text past its bound) are not."""

from __future__ import annotations

import json

import pytest
from xgrammar.testing import _is_grammar_accept_string

from flashserve.api.chat import generation_request
from flashserve.api.schemas import ChatCompletionRequest
from flashserve.chat.deepseek_v4 import render_tool_calls
from flashserve.chat.dsml import DsmlToolCallParser
from flashserve.chat.structured import DSML_STRING_CHARS, dsml_calls_grammar
from flashserve.chat.tools import plan_tools

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                     "metric": {"type": "boolean"}, "note": {"type": "string"}},
    "required": ["city", "days", "metric"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def grammar(choice: object = "required", parallel: bool = True) -> object:
    request = ChatCompletionRequest.model_validate({
        "model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER, TIME],
        "tool_choice": choice, "parallel_tool_calls": parallel})
    plan = plan_tools(generation_request(request))
    tools = [t for t in plan.tools if plan.choice != "named" or t.name == plan.named]
    return dsml_calls_grammar(plan, tools)


def call(name: str, **arguments: object) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


def test_rendered_calls_are_accepted_and_parsed_back_typed() -> None:
    text = render_tool_calls([call("get_weather", city="Paris", days=3, metric=True),
                              call("get_time")])
    assert _is_grammar_accept_string(grammar(), text)
    parser = DsmlToolCallParser(["get_weather", "get_time"])
    content, calls = parser.feed(text)
    assert content == "" and parser.finish() == ""
    assert [c.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].arguments) == {"city": "Paris", "days": 3, "metric": True}


def test_calls_outside_the_tools_are_refused() -> None:
    g = grammar()
    assert not _is_grammar_accept_string(g, render_tool_calls([call("get_wether", city="x", days=1, metric=False)]))
    assert not _is_grammar_accept_string(g, render_tool_calls([call("get_weather", city="x", metric=False)]))
    assert not _is_grammar_accept_string(g, render_tool_calls([call("get_weather", city="x", days="1",
                                                                    metric=False)]))
    too_long = "a" * (DSML_STRING_CHARS + 1)
    assert not _is_grammar_accept_string(g, render_tool_calls([call("get_weather", city=too_long, days=1,
                                                                    metric=False)]))
    assert _is_grammar_accept_string(g, render_tool_calls([call("get_weather", city=too_long[:-1], days=1,
                                                                metric=False)]))


@pytest.mark.parametrize(("choice", "parallel"), [({"type": "function", "function": {"name": "get_time"}}, True),
                                                  ("required", False)])
def test_one_call_when_named_or_not_parallel(choice: object, parallel: bool) -> None:
    g = grammar(choice, parallel)
    assert _is_grammar_accept_string(g, render_tool_calls([call("get_time")]))
    assert not _is_grammar_accept_string(g, render_tool_calls([call("get_time"), call("get_time")]))
