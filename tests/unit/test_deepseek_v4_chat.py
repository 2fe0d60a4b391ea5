"""The DeepSeek-V4 prompt encoder (golden prompts) and the streaming DSML tool-call parser.

The expected prompts are written out by hand, tokens and all, so a wrong
constant in the encoder fails here instead of agreeing with itself.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flashserve.chat.deepseek_v4 import DeepseekV4Template, encode_messages, render_tool_calls
from flashserve.chat.dsml import DsmlToolCallParser
from flashserve.chat.tools import ParsedCall
from tests.unit.test_tools import feed_all

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
U = "<｜User｜>"
A = "<｜Assistant｜>"

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}

WEATHER_TOOLS_SECTION = """## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by writing a \
"<｜DSML｜tool_calls>" block like the following:

<｜DSML｜tool_calls>
<｜DSML｜invoke name="$TOOL_NAME">
<｜DSML｜parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</｜DSML｜parameter>
...
</｜DSML｜invoke>
<｜DSML｜invoke name="$TOOL_NAME2">
...
</｜DSML｜invoke>
</｜DSML｜tool_calls>

String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, \
arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside \
<think>...</think> BEFORE any tool calls or final response.

Otherwise, output directly after </think> with tool calls or final response.

### Available Tool Schemas

{"name": "get_weather", "description": "Weather in a city", "parameters": {"type": "object", "properties": \
{"city": {"type": "string"}}, "required": ["city"]}}

You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.
"""

MAX_PREAMBLE = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root "
    "cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial "
    "scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
    "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n"
)

SYSTEM_USER = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}]

TWO_TURNS = [
    {"role": "system", "content": "S"},
    {"role": "user", "content": "u1"},
    {"role": "assistant", "reasoning_content": "r1", "content": "a1"},
    {"role": "user", "content": "u2"},
]


def call(call_id: str, name: str, arguments: Any) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


# -- encoder: golden prompts ---------------------------------------------------------------------------
def test_system_and_user_in_chat_mode_close_the_thinking_block_at_once() -> None:
    assert encode_messages(SYSTEM_USER) == f"{BOS}You are terse.{U}Hi{A}</think>"


def test_system_and_user_in_thinking_mode_open_the_thinking_block() -> None:
    assert encode_messages(SYSTEM_USER, thinking=True) == f"{BOS}You are terse.{U}Hi{A}<think>"


def test_earlier_reasoning_is_dropped_without_tools() -> None:
    assert encode_messages(TWO_TURNS, thinking=True) == f"{BOS}S{U}u1{A}</think>a1{EOS}{U}u2{A}<think>"


def test_earlier_reasoning_is_kept_when_the_request_has_tools() -> None:
    expected = f"{BOS}S\n\n{WEATHER_TOOLS_SECTION}{U}u1{A}<think>r1</think>a1{EOS}{U}u2{A}<think>"
    assert encode_messages(TWO_TURNS, tools=[WEATHER], thinking=True) == expected


def test_chat_mode_never_renders_reasoning() -> None:
    assert encode_messages(TWO_TURNS) == f"{BOS}S{U}u1{A}</think>a1{EOS}{U}u2{A}</think>"
    expected = f"{BOS}S\n\n{WEATHER_TOOLS_SECTION}{U}u1{A}</think>a1{EOS}{U}u2{A}</think>"
    assert encode_messages(TWO_TURNS, tools=[WEATHER]) == expected


def test_reasoning_after_the_last_user_turn_is_kept() -> None:
    messages = [*TWO_TURNS, {"role": "assistant", "reasoning_content": "r2", "content": "a2"}]
    expected = f"{BOS}S{U}u1{A}</think>a1{EOS}{U}u2{A}<think>r2</think>a2{EOS}"
    assert encode_messages(messages, thinking=True) == expected


def test_tools_without_a_system_message_stand_alone_after_bos() -> None:
    expected = f"{BOS}\n\n{WEATHER_TOOLS_SECTION}{U}Hi{A}</think>"
    assert encode_messages([{"role": "user", "content": "Hi"}], tools=[WEATHER]) == expected


def test_developer_messages_are_user_turns_of_their_own() -> None:
    messages = [{"role": "developer", "content": "Answer in French."}, {"role": "user", "content": "Hi"}]
    expected = f"{BOS}{U}Answer in French.{U}Hi{A}<think>"
    assert encode_messages(messages, thinking=True) == expected
    with_tools = f"{BOS}{U}Answer in French.\n\n{WEATHER_TOOLS_SECTION}{U}Hi{A}</think>"
    assert encode_messages(messages, tools=[WEATHER]) == with_tools


def test_tool_calls_and_results_are_merged_in_call_order() -> None:
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Weather in Paris and Zürich?"},
        {"role": "assistant", "content": None, "reasoning_content": "Two cities.", "tool_calls": [
            call("c1", "get_weather", '{"city": "Paris", "days": 2}'),
            call("c2", "get_weather", {"city": "Zürich", "detail": {"hourly": True, "units": None}}),
        ]},
        # Answered out of order: the prompt puts them back in call order.
        {"role": "tool", "tool_call_id": "c2", "content": "Zürich: 14C"},
        {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "Paris:"},
                                                          {"type": "text", "text": "18C"}]},
        {"role": "user", "content": "Thanks."},
    ]
    expected = (
        f"{BOS}S\n\n{WEATHER_TOOLS_SECTION}{U}Weather in Paris and Zürich?{A}<think>Two cities.</think>\n\n"
        "<｜DSML｜tool_calls>\n"
        '<｜DSML｜invoke name="get_weather">\n'
        '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="days" string="false">2</｜DSML｜parameter>\n'
        "</｜DSML｜invoke>\n"
        '<｜DSML｜invoke name="get_weather">\n'
        '<｜DSML｜parameter name="city" string="true">Zürich</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="detail" string="false">{"hourly": true, "units": null}</｜DSML｜parameter>\n'
        "</｜DSML｜invoke>\n"
        f"</｜DSML｜tool_calls>{EOS}"
        f"{U}<tool_result>Paris:\n\n18C</tool_result>\n\n<tool_result>Zürich: 14C</tool_result>\n\nThanks.{A}<think>"
    )
    assert encode_messages(messages, tools=[WEATHER], thinking=True) == expected


def test_max_effort_preamble_only_in_thinking_mode() -> None:
    assert encode_messages(SYSTEM_USER, thinking=True, reasoning_effort="max") == (
        f"{BOS}{MAX_PREAMBLE}You are terse.{U}Hi{A}<think>")
    plain = f"{BOS}You are terse.{U}Hi{A}<think>"
    assert encode_messages(SYSTEM_USER, thinking=True, reasoning_effort="high") == plain
    assert encode_messages(SYSTEM_USER, thinking=True, reasoning_effort=None) == plain
    assert encode_messages(SYSTEM_USER, reasoning_effort="max") == f"{BOS}You are terse.{U}Hi{A}</think>"


def test_generation_prompt_can_be_left_off() -> None:
    assert encode_messages(SYSTEM_USER, thinking=True, add_generation_prompt=False) == f"{BOS}You are terse.{U}Hi"


def test_consecutive_user_messages_share_one_turn_and_text_parts_are_joined() -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "user", "content": "c"}]
    assert encode_messages(messages) == f"{BOS}{U}a\nb\n\nc{A}</think>"


def test_render_tool_calls_flags_strings_and_writes_other_values_as_json() -> None:
    rendered = render_tool_calls([call("x", "f", {"s": "42", "n": 42, "b": False, "z": None, "l": [1, "é"]}),
                                  call("y", "g", "")])
    assert rendered == (
        "<｜DSML｜tool_calls>\n"
        '<｜DSML｜invoke name="f">\n'
        '<｜DSML｜parameter name="s" string="true">42</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="n" string="false">42</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="b" string="false">false</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="z" string="false">null</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="l" string="false">[1, "é"]</｜DSML｜parameter>\n'
        "</｜DSML｜invoke>\n"
        '<｜DSML｜invoke name="g">\n'
        "\n"
        "</｜DSML｜invoke>\n"
        "</｜DSML｜tool_calls>"
    )
    assert render_tool_calls([call("x", "f", '{"n": 1}')]) == render_tool_calls([call("x", "f", {"n": 1})])


@pytest.mark.parametrize("messages,kwargs,error", [
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [call("c1", "f", "{}")]},
      {"role": "tool", "tool_call_id": "nope", "content": "x"}], {}, "tool_call_id 'nope'"),
    ([{"role": "tool", "tool_call_id": "c1", "content": "x"}], {}, "tool_call_id 'c1'"),
    ([{"role": "function", "content": "x"}], {}, "unknown role 'function'"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], {}, "only text parts"),
    ([{"role": "assistant", "tool_calls": [call("c1", "f", "[1, 2]")]}], {}, "must be a JSON object"),
    ([{"role": "assistant", "tool_calls": [call("c1", "f", "{oops")]}], {}, "not valid JSON"),
    ([{"role": "user", "content": "hi"}], {"reasoning_effort": "medium"}, "reasoning_effort"),
    ([], {}, "at least one message"),
])
def test_input_the_format_cannot_express_is_a_value_error(messages: list, kwargs: dict, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        encode_messages(messages, **kwargs)


# -- parser ---------------------------------------------------------------------------------------------
SAMPLE_CALLS = [
    call("a", "get_weather", {"city": "Zürich", "days": 3, "hourly": True, "units": None,
                              "hours": [6, 12.5], "extra": {"lang": "de"}}),
    call("b", "search", {"query": 'say "hi"\n<b>bold</b>', "limit": "10"}),
]
SAMPLE_ARGUMENTS = [{"city": "Zürich", "days": 3, "hourly": True, "units": None, "hours": [6, 12.5],
                     "extra": {"lang": "de"}}, {"query": 'say "hi"\n<b>bold</b>', "limit": "10"}]
SAMPLE = "Checking — one moment.\n\n" + render_tool_calls(SAMPLE_CALLS) + "\n\nDone ✓"
NAMES = ["get_weather", "search"]


def run(pieces: list[str] | list[bytes], names: list[str] = NAMES, max_calls: int | None = None,
        ) -> tuple[str, list[ParsedCall]]:
    return feed_all(DsmlToolCallParser(names, max_calls), pieces)  # type: ignore[arg-type]


def arguments_of(calls: list[ParsedCall]) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in calls]


def assert_sample_result(content: str, calls: list[ParsedCall]) -> None:
    assert content == "Checking — one moment.Done ✓"
    assert arguments_of(calls) == list(zip(NAMES, SAMPLE_ARGUMENTS, strict=True))


def test_sample_output_gives_content_and_typed_calls() -> None:
    content, calls = run([SAMPLE])
    assert_sample_result(content, calls)
    assert all(c.id.startswith("call_") for c in calls) and calls[0].id != calls[1].id


def test_a_split_at_any_character_changes_nothing() -> None:
    expected = run([SAMPLE])
    for cut in range(1, len(SAMPLE)):
        content, calls = run([SAMPLE[:cut], SAMPLE[cut:]])
        assert (content, arguments_of(calls)) == (expected[0], arguments_of(expected[1])), f"split at {cut}"


def test_a_split_at_any_byte_changes_nothing() -> None:
    expected = run([SAMPLE])
    data = SAMPLE.encode()
    for cut in range(1, len(data)):
        content, calls = run([data[:cut], data[cut:]])
        assert (content, arguments_of(calls)) == (expected[0], arguments_of(expected[1])), f"split at byte {cut}"


def test_one_character_or_one_byte_at_a_time() -> None:
    assert_sample_result(*run(list(SAMPLE)))
    data = SAMPLE.encode()
    assert_sample_result(*run([data[i:i + 1] for i in range(len(data))]))


def test_calls_arrive_with_the_closing_tag_and_content_as_soon_as_it_is_plain() -> None:
    parser = DsmlToolCallParser(NAMES)
    assert parser.feed("Hello wor") == ("Hello wor", [])
    assert parser.feed("ld <｜DS") == ("ld ", [])  # could be a marker: held
    assert parser.feed("x> ok\n") == ("<｜DSx> ok", [])  # the newline could start the blank line before a block
    block = render_tool_calls([call("c", "search", {"query": "q"})])
    assert parser.feed("\n" + block[:-1]) == ("", [])
    content, calls = parser.feed(block[-1:])
    assert content == "" and arguments_of(calls) == [("search", {"query": "q"})]
    assert parser.finish() == ""


def test_a_string_flagged_value_stays_a_string_whatever_it_looks_like() -> None:
    block = ('<｜DSML｜tool_calls>\n<｜DSML｜invoke name="search">\n'
             '<｜DSML｜parameter name="query" string="true">[1, 2]</｜DSML｜parameter>\n'
             '<｜DSML｜parameter name="limit" string="true">007</｜DSML｜parameter>\n'
             '<｜DSML｜parameter name="pad" string="true"> kept \n</｜DSML｜parameter>\n'
             '<｜DSML｜parameter name="on" string="false"> true </｜DSML｜parameter>\n'
             "</｜DSML｜invoke>\n</｜DSML｜tool_calls>")
    expected = {"query": "[1, 2]", "limit": "007", "pad": " kept \n", "on": True}
    assert arguments_of(run([block])[1]) == [("search", expected)]


def test_max_calls_drops_the_calls_after_it() -> None:
    content, calls = run([SAMPLE], max_calls=1)
    assert [c.name for c in calls] == ["get_weather"] and content == "Checking — one moment.Done ✓"


def test_text_without_blocks_passes_through_untouched() -> None:
    text = "Tags like <｜DSML｜invoke> or </｜DSML｜tool_calls> alone are text.\n\n<think>\n\n"
    assert run([text]) == (text, [])
    assert run(list(text)) == (text, [])


VALID_INVOKE = '<｜DSML｜invoke name="search">\n<｜DSML｜parameter name="query" string="true">q</｜DSML｜parameter>\n'


@pytest.mark.parametrize("body", [
    pytest.param(VALID_INVOKE.replace("search", "rm_rf"), id="unknown tool"),
    pytest.param(VALID_INVOKE.replace('string="true">q', 'string="false">q'), id="value is not JSON"),
    pytest.param(VALID_INVOKE.replace('string="true">q', 'string="false">NaN'), id="NaN is not JSON"),
    pytest.param(VALID_INVOKE.replace(' string="true"', ""), id="no string flag"),
    pytest.param(VALID_INVOKE.replace('"true"', '"yes"'), id="bad string flag"),
    pytest.param(VALID_INVOKE + VALID_INVOKE.split("\n", 1)[1], id="duplicate parameter"),
    pytest.param(VALID_INVOKE.replace(">q<", ">q <｜DSML｜parameter name=\"x\" string=\"true\">y<"),
                 id="tag inside a value"),
    pytest.param(VALID_INVOKE + "stray text\n", id="text between elements"),
    pytest.param('<｜DSML｜invoke name="">\n', id="empty name"),
])
def test_malformed_blocks_come_back_as_text(body: str) -> None:
    text = f"Before.\n\n<｜DSML｜tool_calls>\n{body}</｜DSML｜invoke>\n</｜DSML｜tool_calls>\n\nAfter."
    assert run([text]) == (text, [])
    assert run(list(text)) == (text, [])


def test_an_empty_or_unfinished_block_comes_back_as_text() -> None:
    empty = "x\n\n<｜DSML｜tool_calls>\n</｜DSML｜tool_calls>"
    assert run([empty]) == (empty, [])
    cut_off = "x\n\n<｜DSML｜tool_calls>\n" + VALID_INVOKE
    assert run([cut_off]) == (cut_off, [])


def test_a_malformed_block_does_not_hide_a_valid_one_after_it() -> None:
    bad = '<｜DSML｜tool_calls>\n<｜DSML｜invoke name="rm_rf">\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>'
    good = render_tool_calls([call("c", "search", {"query": "q"})])
    content, calls = run([bad + "\n\n" + good])
    assert content == bad and arguments_of(calls) == [("search", {"query": "q"})]


def test_a_malformed_block_is_released_before_the_stream_ends() -> None:
    parser = DsmlToolCallParser(NAMES)
    content, calls = parser.feed('<｜DSML｜tool_calls>\n<｜DSML｜invoke name="rm_rf">\nmore')
    assert content == '<｜DSML｜tool_calls>\n<｜DSML｜invoke name="rm_rf">\nmore' and calls == []


def test_invalid_utf8_becomes_replacement_characters() -> None:
    assert run([b"ok \xff", b"\xe2\x82", b" end"]) == ("ok \ufffd\ufffd end", [])
    assert run([b"cut \xe2\x82"]) == ("cut \ufffd", [])


FRAGMENTS = ["<｜DSML｜tool_calls>", "</｜DSML｜tool_calls>", '<｜DSML｜invoke name="search">', "</｜DSML｜invoke>",
             '<｜DSML｜parameter name="query" string="true">', '<｜DSML｜parameter name="n" string="false">',
             "</｜DSML｜parameter>", "\n", "\n\n", "<", "｜", "DSML", '"', ">", "1", "x", "é", "{", "}"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=30), st.lists(st.integers(0, 400), max_size=6))
def test_any_text_split_anywhere_never_raises_and_loses_nothing_without_calls(
        fragments: list[str], cuts: list[int]) -> None:
    text = "".join(fragments)
    data = text.encode()
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    content, calls = run([data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)])
    if not calls:
        assert content == text
    for c in calls:
        assert isinstance(json.loads(c.arguments), dict)


def test_fill_in_the_middle_and_raw_prompts() -> None:
    template = DeepseekV4Template()
    assert template.fim_prompt("def f(", "return 1") == (
        "<｜begin▁of▁sentence｜><｜fim▁begin｜>def f(<｜fim▁hole｜>return 1<｜fim▁end｜>")
    assert template.raw_prompt("Once") == "<｜begin▁of▁sentence｜>Once"
    assert template.raw_prompt("<｜begin▁of▁sentence｜>Once") == "<｜begin▁of▁sentence｜>Once"  # not twice
