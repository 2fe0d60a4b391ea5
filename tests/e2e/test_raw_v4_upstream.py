"""A remote upstream that streams raw DeepSeek-V4 text (`raw_text = "deepseek_v4"` in the catalog), end to end.

The upstream is the scripted V4 stand-in (tests/e2e/scripted_v4_upstream.py) as a real process: its
`content` is the model's own text (thinking, `</think>`, a DSML block), cut every few characters through
the markers. flashserve (the session's shared server, tests/e2e/scripted.py, whose catalog points `v4-raw`
at it) must turn that into what the
`openai` client expects of V4: `reasoning_content`, `content` free of markup, `tool_calls` with
finish_reason `tool_calls`, streamed and not; and a second turn sending the reasoning and the calls back
must be accepted (issue 16 §3). The catalog's `max_output_tokens_cap` clamps what the upstream is asked for.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.e2e.scripted import KEY, RAW_MODEL, Upstreams

MODEL = RAW_MODEL  # played by tests/e2e/scripted.py: RAW_SCRIPT, with `max_output_tokens_cap = 50`
SHELL = {"type": "function", "function": {"name": "shell", "description": "Run a command", "parameters": {
    "type": "object", "properties": {"command": {"type": "string"}, "timeout": {"type": "integer"}},
    "required": ["command", "timeout"]}}}


@pytest.fixture(scope="module")
def raw_v4(upstreams: Upstreams) -> Iterator[tuple[openai.OpenAI, str]]:
    with openai.OpenAI(base_url=f"{upstreams.base}/v1", api_key=KEY, max_retries=0, timeout=60) as client:
        yield client, upstreams.upstream[MODEL]


def ask(client: openai.OpenAI, **kwargs: object) -> object:
    args: dict[str, object] = {"model": MODEL, "messages": [{"role": "user", "content": "list the files"}],
                               "tools": [SHELL]}
    args.update(kwargs)
    return client.chat.completions.create(**args)  # type: ignore[call-overload]


def test_a_tool_call_turn(raw_v4: tuple[openai.OpenAI, str]) -> None:
    client, upstream = raw_v4
    r = ask(client)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert getattr(choice.message, "reasoning_content", None) == "I should list the files."
    assert not choice.message.content
    [call] = choice.message.tool_calls
    assert call.function.name == "shell" and call.id
    assert json.loads(call.function.arguments) == {"command": "ls -la", "timeout": 5}
    assert r.usage.completion_tokens_details.reasoning_tokens > 0
    sent = httpx.get(f"{upstream}/requests").json()[-1]
    assert sent["chat_template_kwargs"] == {"thinking": True, "reasoning_effort": "high"} and sent["tools"]


def test_a_streamed_tool_call_turn(raw_v4: tuple[openai.OpenAI, str]) -> None:
    client, _ = raw_v4
    reasoning, content, names, arguments, finish = "", "", [], "", None
    for chunk in ask(client, stream=True):
        for choice in chunk.choices:
            delta = choice.delta
            reasoning += getattr(delta, "reasoning_content", None) or ""
            content += delta.content or ""
            for piece in delta.tool_calls or []:
                if piece.function and piece.function.name:
                    names.append(piece.function.name)
                if piece.function and piece.function.arguments:
                    arguments += piece.function.arguments
            finish = choice.finish_reason or finish
    assert (reasoning, content, names, finish) == ("I should list the files.", "", ["shell"], "tool_calls")
    assert json.loads(arguments) == {"command": "ls -la", "timeout": 5}


def test_the_next_turn_sends_reasoning_and_calls_back(raw_v4: tuple[openai.OpenAI, str]) -> None:
    client, upstream = raw_v4
    first = ask(client).choices[0].message
    messages = [{"role": "user", "content": "list the files"},
                {"role": "assistant", "content": None, "reasoning_content": first.reasoning_content,
                 "tool_calls": [c.model_dump() for c in first.tool_calls]},
                {"role": "tool", "tool_call_id": first.tool_calls[0].id, "content": "a.txt b.txt"}]
    for stream in (False, True):
        if stream:
            text = "".join(c.choices[0].delta.content or "" for c in ask(client, messages=messages, stream=True)
                           if c.choices)
        else:
            r = ask(client, messages=messages)
            assert r.choices[0].finish_reason == "stop" and not r.choices[0].message.tool_calls
            assert r.choices[0].message.reasoning_content == "Two files."
            text = r.choices[0].message.content
        assert text == "There are two files."
    sent = httpx.get(f"{upstream}/requests").json()[-1]
    assert sent["messages"][1]["reasoning_content"] == "I should list the files."


def test_the_model_card_says_it_thinks_by_default(raw_v4: tuple[openai.OpenAI, str]) -> None:
    client, _ = raw_v4
    card = client.models.retrieve(MODEL).model_extra or {}
    assert card["reasoning"] is True and card["reasoning_default"] is True  # as upstream_body asks it to


def test_without_tools_and_with_thinking_off(raw_v4: tuple[openai.OpenAI, str]) -> None:
    client, upstream = raw_v4
    r = ask(client, tools=None, messages=[{"role": "user", "content": "hi"}])
    assert (r.choices[0].message.content, r.choices[0].message.reasoning_content) == ("Hello!", "Easy.")
    ask(client, tools=None, messages=[{"role": "user", "content": "hi"}], reasoning_effort="none")
    assert httpx.get(f"{upstream}/requests").json()[-1]["chat_template_kwargs"] == {"thinking": False}


def test_the_catalog_output_cap_clamps_max_tokens(raw_v4: tuple[openai.OpenAI, str]) -> None:
    client, upstream = raw_v4
    assert ask(client, max_tokens=128000).choices[0].finish_reason == "tool_calls"  # clamped, not refused
    assert httpx.get(f"{upstream}/requests").json()[-1]["max_tokens"] == 50
    ask(client, max_tokens=7)
    assert httpx.get(f"{upstream}/requests").json()[-1]["max_tokens"] == 7
    ask(client)
    assert httpx.get(f"{upstream}/requests").json()[-1]["max_tokens"] == 50
