"""Chat template rendering: SmolLM2's own template, message rules (developer, tool calls, None content),
the sandbox, and errors."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest

from flashserve.chat.template import CHATML_TEMPLATE, ChatTemplate, TemplateError, format_tool_calls
from flashserve.models.loading import Checkpoint

DEFAULT_SYSTEM = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
)


@pytest.fixture(scope="module")
def smol(smollm: Checkpoint) -> ChatTemplate:
    return ChatTemplate.from_checkpoint(smollm)


def test_default_system_prompt_and_generation_prompt(smol: ChatTemplate) -> None:
    out = smol.render([{"role": "user", "content": "hi"}])
    assert out == DEFAULT_SYSTEM + "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_own_system_prompt_replaces_default(smol: ChatTemplate) -> None:
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    out = smol.render(msgs, add_generation_prompt=False)
    assert out == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"


def test_multi_turn(smol: ChatTemplate) -> None:
    msgs = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"},
    ]
    out = smol.render(msgs)
    assert out.endswith(
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_matches_transformers_rendering(smollm: Checkpoint, smol: ChatTemplate) -> None:
    chat_utils = pytest.importorskip("transformers.utils.chat_template_utils")
    conversations: list[list[dict[str, Any]]] = [
        [{"role": "user", "content": "hi"}],
        [{"role": "system", "content": "S"}, {"role": "user", "content": "ünïcode 😀"}],
        [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
        ],
    ]
    for chat in conversations:
        for gen in (True, False):
            (expected,), _ = chat_utils.render_jinja_template(
                conversations=[chat],
                chat_template=smollm.chat_template,
                add_generation_prompt=gen,
                bos_token=smollm.bos_token,
                eos_token=smollm.eos_token,
            )
            assert smol.render(chat, add_generation_prompt=gen) == expected


def test_developer_becomes_system_when_template_ignores_it(smol: ChatTemplate) -> None:
    out = smol.render([{"role": "developer", "content": "Rules."}, {"role": "user", "content": "hi"}])
    assert out.startswith("<|im_start|>system\nRules.<|im_end|>\n<|im_start|>user\n")
    assert "developer" not in out and "SmolLM" not in out


def test_developer_kept_when_template_knows_it() -> None:
    t = ChatTemplate(
        "{% for m in messages %}{% if m.role == 'developer' %}DEV:{% endif %}"
        "{{ m.role }}={{ m.content }};{% endfor %}"
    )
    assert t.render([{"role": "developer", "content": "x"}]) == "DEV:developer=x;"


TOOL_CONVERSATION: list[dict[str, Any]] = [
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            },
            {
                "id": "call_2",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
            },
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
    {"role": "tool", "tool_call_id": "call_2", "content": "22C"},
]


def test_tool_calls_rendered_into_content_when_template_ignores_them(smol: ChatTemplate) -> None:
    out = smol.render(TOOL_CONVERSATION)
    expected_assistant = (
        "<|im_start|>assistant\n"
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n'
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call><|im_end|>\n'
    )
    assert expected_assistant in out
    assert "<|im_start|>tool\n18C<|im_end|>\n<|im_start|>tool\n22C<|im_end|>\n" in out
    assert out.endswith("<|im_start|>assistant\n")


def test_tool_calls_appended_after_text_content(smol: ChatTemplate) -> None:
    msgs = [
        {"role": "user", "content": "q"},
        {
            "role": "assistant",
            "content": "Let me check.",
            "tool_calls": TOOL_CONVERSATION[1]["tool_calls"][:1],
        },
    ]
    out = smol.render(msgs, add_generation_prompt=False)
    assert out.endswith(
        "<|im_start|>assistant\nLet me check.\n"
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call><|im_end|>\n'
    )


def test_non_json_arguments_kept_as_string() -> None:
    text = format_tool_calls([{"function": {"name": "f", "arguments": "not json"}}])
    assert json.loads(text.removeprefix("<tool_call>").removesuffix("</tool_call>")) == {
        "name": "f",
        "arguments": "not json",
    }


def test_template_handling_tool_calls_gets_dict_arguments() -> None:
    t = ChatTemplate(
        "{% for m in messages %}{% for c in m.tool_calls or [] %}"
        "{{ c.function.name }}{{ c.function.arguments | tojson }}|{% endfor %}{% endfor %}"
    )
    assert t.render(TOOL_CONVERSATION, add_generation_prompt=False) == (
        'get_weather{"city": "Paris"}|get_weather{"city": "Rome"}|'
    )


def test_none_content_and_input_not_mutated(smol: ChatTemplate) -> None:
    msgs = [{"role": "user", "content": "x"}, {"role": "assistant", "content": None}]
    snapshot = json.dumps(msgs)
    tool_snapshot = json.dumps(TOOL_CONVERSATION)
    out = smol.render(msgs, add_generation_prompt=False)
    assert out.endswith("<|im_start|>assistant\n<|im_end|>\n")
    smol.render(TOOL_CONVERSATION)
    assert json.dumps(msgs) == snapshot and json.dumps(TOOL_CONVERSATION) == tool_snapshot


def test_tools_and_helpers_available() -> None:
    t = ChatTemplate(
        "{% if tools is not none %}{{ tools | tojson }}{% endif %}|{{ strftime_now('%Y') | length }}"
        "|{{ {'k': 'é'} | tojson }}|{% generation %}gen{% endgeneration %}"
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}|{{ ns.n }}"
    )
    out = t.render(
        [{"role": "user", "content": "a"}], tools=[{"type": "function", "function": {"name": "f"}}]
    )
    assert out == '[{"type": "function", "function": {"name": "f"}}]|4|{"k": "é"}|gen|1'
    assert t.render([]).startswith("|4|")


def test_chatml_fallback() -> None:
    ck = SimpleNamespace(chat_template=None, bos_token=None, eos_token="<|im_end|>")
    t = ChatTemplate.from_checkpoint(ck)
    assert t.source == CHATML_TEMPLATE
    assert (
        t.render([{"role": "user", "content": "hi"}])
        == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__.__init__.__globals__ }}",
        "{{ cycler.__init__.__globals__.os }}",
        "{{ raise_exception.__globals__ }}",
        "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
        "{{ messages.append({'role': 'x'}) }}",
        "{{ messages[0].update({'role': 'x'}) }}",
        "{{ messages.pop() }}",
    ],
)
def test_sandbox_blocks_escapes_and_mutation(source: str) -> None:
    t = ChatTemplate(source)
    try:
        out = t.render([{"role": "user", "content": "hi"}])
    except TemplateError:
        return
    # Unsafe attribute access may render as an empty Undefined instead of raising: either way, nothing leaks.
    assert out.strip() == "", out


def test_raise_exception_becomes_template_error() -> None:
    t = ChatTemplate("{{ raise_exception('Conversation roles must alternate') }}")
    with pytest.raises(TemplateError, match="Conversation roles must alternate"):
        t.render([{"role": "user", "content": "hi"}])


def test_syntax_and_runtime_errors_become_template_errors() -> None:
    with pytest.raises(TemplateError, match="does not compile"):
        ChatTemplate("{% for m in messages %}")
    t = ChatTemplate("{{ messages[0]['content'] + 1 }}")
    with pytest.raises(TemplateError, match="chat template failed"):
        t.render([{"role": "user", "content": "hi"}])
    t = ChatTemplate("{{ messages[5]['content'] }}")
    with pytest.raises(TemplateError):
        t.render([{"role": "user", "content": "hi"}])
