"""Tool plans (validation of tools/tool_choice), the system-prompt rendering, and the call parser."""

from __future__ import annotations

import json

import pytest

from flashserve.api.chat import generation_request
from flashserve.api.schemas import ChatCompletionRequest
from flashserve.chat.tools import ToolCallParser, plan_tools, tools_system_prompt, with_tools_in_system_prompt
from flashserve.errors import FlashserveError
from flashserve.generation import GenerationRequest

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}


def request(**kw: object) -> GenerationRequest:
    return generation_request(ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **kw}))


def test_default_choice_is_auto_with_tools_and_none_without() -> None:
    assert plan_tools(request(tools=[WEATHER])).choice == "auto"
    assert plan_tools(request()).choice == "none"
    plan = plan_tools(request(tools=[WEATHER, TIME], tool_choice={"type": "function",
                                                                   "function": {"name": "get_time"}}))
    assert (plan.choice, plan.named, plan.parallel) == ("named", "get_time", True)
    assert plan_tools(request(tools=[WEATHER], parallel_tool_calls=False)).parallel is False


@pytest.mark.parametrize("kw,param", [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "tools[0].function.parameters"),
])
def test_invalid_tool_settings_are_400s(kw: dict, param: str) -> None:
    with pytest.raises(FlashserveError) as err:
        plan_tools(request(**kw))
    assert err.value.status == 400 and err.value.param == param


def test_tools_are_described_in_the_system_prompt() -> None:
    plan = plan_tools(request(tools=[WEATHER], tool_choice="required"))
    text = tools_system_prompt(plan)
    assert '"name": "get_weather"' in text and "<tool_call>" in text and "must call" in text
    messages = with_tools_in_system_prompt([{"role": "user", "content": "hi"}], plan)
    assert messages[0]["role"] == "system" and text in messages[0]["content"]
    merged = with_tools_in_system_prompt([{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "hi"}], plan)
    assert merged[0]["content"].startswith("Be brief.") and len(merged) == 2


def feed_all(parser: ToolCallParser, pieces: list[str]) -> tuple[str, list]:
    content, calls = "", []
    for piece in pieces:
        c, k = parser.feed(piece)
        content += c
        calls += k
    return content + parser.finish(), calls


def test_parser_splits_text_and_calls_across_any_chunking() -> None:
    text = 'Let me check.<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n' \
           '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>\n'
    for size in (1, 2, 5, 17, len(text)):
        content, calls = feed_all(ToolCallParser(["get_weather", "get_time"]),
                                  [text[i:i + size] for i in range(0, len(text), size)])
        assert content == "Let me check."
        assert [c.name for c in calls] == ["get_weather", "get_time"]
        assert json.loads(calls[0].arguments) == {"city": "Paris"}
        assert all(c.id.startswith("call_") for c in calls) and calls[0].id != calls[1].id


def test_unknown_functions_and_broken_calls_stay_text() -> None:
    content, calls = feed_all(ToolCallParser(["get_weather"]),
                              ['<tool_call>{"name": "other", "arguments": {}}</tool_call>'])
    assert calls == [] and "other" in content
    content, calls = feed_all(ToolCallParser(["get_weather"]), ['<tool_call>{"name": "get_weather", "argu'])
    assert calls == [] and content == '<tool_call>{"name": "get_weather", "argu'


def test_a_lookalike_of_the_open_tag_is_released_as_text() -> None:
    content, calls = feed_all(ToolCallParser(["f"]), ["a <tool", "_x> b"])
    assert content == "a <tool_x> b" and calls == []


def test_without_parallel_calls_only_the_first_is_kept() -> None:
    text = ('<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>\n'
            '<tool_call>{"name": "f", "arguments": {}}</tool_call>')
    content, calls = feed_all(ToolCallParser(["f"], max_calls=1), [text])
    assert len(calls) == 1 and json.loads(calls[0].arguments) == {"a": 1} and content == ""
