"""DeepSeek-V4 chat encoding: OpenAI-style messages and tools -> the prompt text.

This module owns the V4 special tokens, the layout of a V4 prompt, the tools
section written into it, and the DSML rendering of assistant tool calls.
Reading DSML back out of generated text belongs to `flashserve.chat.dsml`.

It was written from DeepSeek's published description of the format (the
`encoding/README.md` and reference `encoding/encoding_dsv4.py` of the
deepseek-ai/DeepSeek-V4-Flash model repository) and checked against the
golden prompts shipped beside them. The documented facts it follows:

- The prompt opens with `<｜begin▁of▁sentence｜>`. A system message follows
  as bare text, with no role tag.
- A user turn is `<｜User｜>` and its text. When the model is to answer, the
  turn is followed by `<｜Assistant｜>` and then, in thinking mode, `<think>`
  (the model writes its reasoning, `</think>`, then the answer); in chat mode
  `</think>` instead, which closes an empty thinking block at once.
- A finished assistant turn is its reasoning (thinking mode only) closed by
  `</think>`, its content, its tool calls, and `<｜end▁of▁sentence｜>`.
- Reasoning of assistant turns before the last user turn is dropped, and
  those turns are opened with `</think>` as in chat mode, unless the request
  has tools: then every turn keeps its reasoning and opens with `<think>`.
- With tools, a "## Tools" section (the DSML calling instructions and one
  JSON schema per line) is appended, after a blank line, to the first message
  when it is a system or developer message; otherwise it stands alone as an
  empty system message's text right after the BOS token.
- Tool calls are a DSML block after a blank line:
  `<｜DSML｜tool_calls>`, one `<｜DSML｜invoke name="...">` per call, one
  `<｜DSML｜parameter name="..." string="true|false">` per argument. A string
  argument is written as is with `string="true"`; any other value is written
  as JSON with `string="false"`.
- There is no tool role: tool results are `<tool_result>...</tool_result>`
  blocks inside a user turn, ordered as the assistant's calls were, and
  consecutive user and tool messages share one user turn, their parts joined
  by a blank line. A developer message is a user turn of its own.
- In thinking mode with reasoning effort "max", a fixed preamble precedes
  everything after the BOS token; other efforts add nothing.
- Fill in the middle (DeepSeek's FIM completion, prefix-suffix-middle order):
  `<｜begin▁of▁sentence｜><｜fim▁begin｜>` prefix `<｜fim▁hole｜>` suffix
  `<｜fim▁end｜>`, and the model writes the middle (`fim_prompt`). A raw
  completion prompt is the BOS token and the text (`raw_prompt`).

Where this module departs from the reference on purpose: it raises
`ValueError` where the reference would guess (a tool result for no known
call, arguments that are not a JSON object, non-text content, unknown roles
or efforts), and it keeps developer messages that come before the last user
turn, which the reference drops in thinking mode. The reference's
search-agent extras (`latest_reminder`, quick-instruction task tokens,
`response_format`) are not supported.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_START = "<think>"
THINK_END = "</think>"
DSML = "｜DSML｜"
FIM_BEGIN = "<｜fim▁begin｜>"
FIM_HOLE = "<｜fim▁hole｜>"
FIM_END = "<｜fim▁end｜>"

TOOL_CALLS_OPEN = f"<{DSML}tool_calls>"
TOOL_CALLS_CLOSE = f"</{DSML}tool_calls>"
INVOKE_OPEN_HEAD = f'<{DSML}invoke name="'
INVOKE_CLOSE = f"</{DSML}invoke>"
PARAMETER_OPEN_HEAD = f'<{DSML}parameter name="'
PARAMETER_CLOSE = f"</{DSML}parameter>"
TOOL_RESULT_OPEN = "<tool_result>"
TOOL_RESULT_CLOSE = "</tool_result>"
# Written once before each DSML block, in prompts and by the model alike.
TOOL_CALLS_SEPARATOR = "\n\n"

REASONING_EFFORTS = (None, "high", "max")

MAX_EFFORT_PREAMBLE = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root "
    "cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial "
    "scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
    "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n"
)

# The checkpoint was trained on this exact wording; only the schema lines vary.
_TOOLS_SECTION_HEAD = f"""## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by writing a \
"{TOOL_CALLS_OPEN}" block like the following:

{TOOL_CALLS_OPEN}
{INVOKE_OPEN_HEAD}$TOOL_NAME">
{PARAMETER_OPEN_HEAD}$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE{PARAMETER_CLOSE}
...
{INVOKE_CLOSE}
{INVOKE_OPEN_HEAD}$TOOL_NAME2">
...
{INVOKE_CLOSE}
{TOOL_CALLS_CLOSE}

String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, \
arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by {THINK_START}), you MUST output your complete reasoning inside \
{THINK_START}...{THINK_END} BEFORE any tool calls or final response.

Otherwise, output directly after {THINK_END} with tool calls or final response.

### Available Tool Schemas

"""
_TOOLS_SECTION_TAIL = (
    "\n\nYou MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n"
)


# -- public API --------------------------------------------------------------------------------------
def encode_messages(
    messages: Sequence[Mapping[str, Any]],
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    thinking: bool = False,
    reasoning_effort: str | None = None,
    add_generation_prompt: bool = True,
) -> str:
    """The V4 prompt for an OpenAI-style conversation.

    `thinking` picks thinking mode over chat mode; `reasoning_effort` is
    None, "high" or "max" (only "max" changes the prompt, and only when
    thinking). `add_generation_prompt` opens the assistant's reply
    (`<｜Assistant｜>` and `<think>` or `</think>`) when the conversation ends
    on a user turn; a conversation that ends on an assistant turn is rendered
    as finished. A message's `name` has no place in the format and is not
    rendered. Raises `ValueError` for a conversation the format cannot express.
    """
    if reasoning_effort not in REASONING_EFFORTS:
        raise ValueError(f"reasoning_effort must be one of {REASONING_EFFORTS}, not {reasoning_effort!r}")
    if not messages:
        raise ValueError("a prompt needs at least one message")
    turns = _turns_of(messages)
    if tools:
        _attach_tools_section(turns, render_tools_section(tools))
    preamble = MAX_EFFORT_PREAMBLE if thinking and reasoning_effort == "max" else ""
    layout = _Layout(thinking, keeps_all_reasoning=bool(tools), last_user=_last_user_index(turns))
    body = "".join(_render_turn(turns, i, layout, add_generation_prompt) for i in range(len(turns)))
    return BOS + preamble + body


def fim_prompt(prefix: str, suffix: str) -> str:
    """Fill in the middle: the text before the hole and after it; the model writes the middle."""
    return BOS + FIM_BEGIN + prefix + FIM_HOLE + suffix + FIM_END


def render_tool_calls(tool_calls: Sequence[Mapping[str, Any]]) -> str:
    """OpenAI-style `tool_calls` as one DSML block (without the blank line that precedes it in a turn)."""
    if not tool_calls:
        raise ValueError("a DSML block needs at least one tool call")
    invokes = "\n".join(_render_invoke(call) for call in tool_calls)
    return f"{TOOL_CALLS_OPEN}\n{invokes}\n{TOOL_CALLS_CLOSE}"


def render_tools_section(tools: Sequence[Mapping[str, Any]]) -> str:
    """The "## Tools" section: calling instructions, then each function's schema as one JSON line."""
    schemas = "\n".join(_to_json(dict(_function_of(tool))) for tool in tools)
    return _TOOLS_SECTION_HEAD + schemas + _TOOLS_SECTION_TAIL


# -- conversation -> turns ---------------------------------------------------------------------------
@dataclass(slots=True)
class _ToolResult:
    call_position: int  # where its call stood in the assistant's tool_calls
    text: str


@dataclass(slots=True)
class _SystemTurn:
    text: str


@dataclass(slots=True)
class _UserTurn:
    parts: list[str | _ToolResult] = field(default_factory=list)
    # A developer message keeps its own turn: later user or tool messages never join it.
    from_developer: bool = False


@dataclass(slots=True)
class _AssistantTurn:
    content: str
    reasoning: str
    tool_calls: Sequence[Mapping[str, Any]]


_Turn = _SystemTurn | _UserTurn | _AssistantTurn


def _turns_of(messages: Sequence[Mapping[str, Any]]) -> list[_Turn]:
    turns: list[_Turn] = []
    call_positions: dict[str, int] = {}  # ids of the latest assistant tool calls, which tool results answer
    for index, message in enumerate(messages):
        role = message.get("role")
        if role == "system":
            turns.append(_SystemTurn(_text_of(message.get("content"), index)))
        elif role == "developer":
            turns.append(_UserTurn([_text_of(message.get("content"), index)], from_developer=True))
        elif role == "user":
            _open_user_turn(turns).parts.append(_text_of(message.get("content"), index))
        elif role == "tool":
            _open_user_turn(turns).parts.append(_tool_result_of(message, index, call_positions))
        elif role == "assistant":
            turn = _assistant_turn_of(message, index)
            if turn.tool_calls:
                call_positions = _call_positions(turn.tool_calls)
            turns.append(turn)
        else:
            raise ValueError(f"messages[{index}]: unknown role {role!r}")
    return turns


def _open_user_turn(turns: list[_Turn]) -> _UserTurn:
    """The user turn that a user or tool message joins: the last turn, or a new one."""
    last = turns[-1] if turns else None
    if isinstance(last, _UserTurn) and not last.from_developer:
        return last
    turn = _UserTurn()
    turns.append(turn)
    return turn


def _tool_result_of(message: Mapping[str, Any], index: int, call_positions: Mapping[str, int]) -> _ToolResult:
    call_id = message.get("tool_call_id")
    if call_id not in call_positions:
        raise ValueError(f"messages[{index}]: tool_call_id {call_id!r} matches no call of the last assistant "
                         "message with tool_calls")
    return _ToolResult(call_positions[call_id], _text_of(message.get("content"), index, separator="\n\n"))


def _call_positions(tool_calls: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    return {call["id"]: position for position, call in enumerate(tool_calls) if isinstance(call.get("id"), str)}


def _assistant_turn_of(message: Mapping[str, Any], index: int) -> _AssistantTurn:
    reasoning = message.get("reasoning_content") or ""
    if not isinstance(reasoning, str):
        raise ValueError(f"messages[{index}].reasoning_content must be a string")
    tool_calls = message.get("tool_calls") or ()
    if not isinstance(tool_calls, Sequence) or not all(isinstance(call, Mapping) for call in tool_calls):
        raise ValueError(f"messages[{index}].tool_calls must be a list of tool call objects")
    return _AssistantTurn(_text_of(message.get("content"), index), reasoning, tool_calls)


def _text_of(content: Any, index: int, separator: str = "\n") -> str:
    """A message's text; text parts are joined (with a blank line between a tool result's parts, as DeepSeek does)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        texts = []
        for part in content:
            if not (isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ValueError(f"messages[{index}].content: only text parts can be encoded")
            texts.append(part["text"])
        return separator.join(texts)
    raise ValueError(f"messages[{index}].content must be a string, a list of text parts, or null")


def _attach_tools_section(turns: list[_Turn], section: str) -> None:
    first = turns[0]
    if isinstance(first, _SystemTurn):
        first.text += "\n\n" + section
    elif isinstance(first, _UserTurn) and first.from_developer:
        first.parts[0] = f"{first.parts[0]}\n\n{section}"
    else:
        # An empty system message carries the section: the blank line before it stays, as in the reference.
        turns.insert(0, _SystemTurn("\n\n" + section))


def _last_user_index(turns: Sequence[_Turn]) -> int:
    return max((i for i, turn in enumerate(turns) if isinstance(turn, _UserTurn)), default=-1)


# -- turns -> text -----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Layout:
    thinking: bool
    keeps_all_reasoning: bool
    last_user: int

    def shows_reasoning(self, index: int) -> bool:
        """Whether an assistant turn at `index` is written with its reasoning (and opened with `<think>`)."""
        return self.thinking and (self.keeps_all_reasoning or index > self.last_user)


def _render_turn(turns: Sequence[_Turn], index: int, layout: _Layout, add_generation_prompt: bool) -> str:
    turn = turns[index]
    if isinstance(turn, _SystemTurn):
        return turn.text
    if isinstance(turn, _AssistantTurn):
        return _render_assistant(turn, layout.shows_reasoning(index))
    text = USER + _user_body(turn)
    following = turns[index + 1] if index + 1 < len(turns) else None
    if isinstance(following, _AssistantTurn) or (following is None and add_generation_prompt):
        # The reply after turn `index` is an assistant turn at `index + 1`.
        text += ASSISTANT + (THINK_START if layout.shows_reasoning(index + 1) else THINK_END)
    return text


def _user_body(turn: _UserTurn) -> str:
    in_call_order = iter(sorted((p for p in turn.parts if isinstance(p, _ToolResult)), key=lambda r: r.call_position))
    texts = []
    for part in turn.parts:
        if isinstance(part, _ToolResult):
            # Results keep the slots the tool messages had, filled in the order the calls were made.
            texts.append(TOOL_RESULT_OPEN + next(in_call_order).text + TOOL_RESULT_CLOSE)
        else:
            texts.append(part)
    return "\n\n".join(texts)


def _render_assistant(turn: _AssistantTurn, shows_reasoning: bool) -> str:
    reasoning = turn.reasoning + THINK_END if shows_reasoning else ""
    calls = TOOL_CALLS_SEPARATOR + render_tool_calls(turn.tool_calls) if turn.tool_calls else ""
    return reasoning + turn.content + calls + EOS


# -- DSML --------------------------------------------------------------------------------------------
def _render_invoke(call: Mapping[str, Any]) -> str:
    function = call.get("function")
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise ValueError("a tool call needs a 'function' with a string 'name'")
    name = _checked_attribute(function["name"], "tool name")
    arguments = _arguments_of(function.get("arguments"), name)
    parameters = "\n".join(_render_parameter(key, value) for key, value in arguments.items())
    return f'{INVOKE_OPEN_HEAD}{name}">\n{parameters}\n{INVOKE_CLOSE}'


def _render_parameter(key: str, value: Any) -> str:
    key = _checked_attribute(key, "parameter name")
    is_string = isinstance(value, str)
    text = value if is_string else _to_json(value)
    return f'{PARAMETER_OPEN_HEAD}{key}" string="{"true" if is_string else "false"}">{text}{PARAMETER_CLOSE}'


def _arguments_of(arguments: Any, name: str) -> Mapping[str, Any]:
    """Call arguments as an object; OpenAI sends them as a JSON string, some clients as the object itself."""
    if isinstance(arguments, str):
        if not arguments.strip():
            return {}  # some clients send "" for a call without arguments
        try:
            arguments = json.loads(arguments)
        except ValueError as err:
            raise ValueError(f"arguments of the call to {name!r} are not valid JSON: {err}") from err
    if arguments is None:
        return {}
    if not isinstance(arguments, Mapping):
        raise ValueError(f"arguments of the call to {name!r} must be a JSON object")
    return arguments


def _checked_attribute(value: str, what: str) -> str:
    # The name sits inside a double-quoted DSML attribute, which has no escapes.
    if not value or any(c in value for c in '"<>\n'):
        raise ValueError(f"{what} {value!r} cannot be written in DSML")
    return value


def _function_of(tool: Mapping[str, Any]) -> Mapping[str, Any]:
    function = tool.get("function")
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise ValueError("each tool needs a 'function' object with a 'name'")
    return function


def _to_json(value: Any) -> str:
    # Spaces after separators and raw non-ASCII text: the spelling the checkpoint saw.
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"cannot be written as JSON: {err}") from err


class DeepseekV4Template:
    """`encode_messages` behind the chat-template interface the local backend renders through
    (`chat.template.ChatTemplate`): it renders tools itself, and reads the thinking switch and the
    effort mode ("high" or "max") the backend resolved."""

    handles_tools = True

    @staticmethod
    def raw_prompt(text: str) -> str:
        return text if text.startswith(BOS) else BOS + text

    @staticmethod
    def fim_prompt(prefix: str, suffix: str) -> str:
        return fim_prompt(prefix, suffix)

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, *,
               tools: list[dict[str, Any]] | None = None, thinking: bool = False,
               reasoning_effort: str | None = None, **_: Any) -> str:
        from flashserve.chat.template import TemplateError  # the error the backend turns into a 400

        try:
            return encode_messages(messages, tools=tools, thinking=thinking,
                                   reasoning_effort=reasoning_effort if thinking else None,
                                   add_generation_prompt=add_generation_prompt)
        except ValueError as exc:
            raise TemplateError(str(exc)) from exc
