"""Tool calls: describing tools to a model, constraining its calls, and parsing
them back out of the generated text.

The call format is one line per call, the convention small open models were
trained on most (Hermes/Qwen style):

    <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>

A template that renders tools itself gets them as `tools`; for one that does
not (the embedded SmolLM2's), the tool list and this format are written into
the system prompt (`tools_system_prompt`). Under `tool_choice` "required" or
a named function the whole output is constrained to calls whose arguments
follow each tool's `parameters`; under "auto" the model writes freely, and
once it opens `<tool_call>` the rest of the call is constrained.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from flashserve.errors import invalid_request
from flashserve.generation import GenerationRequest, ToolCall, ToolSpec
from flashserve.ids import call_id

OPEN = "<tool_call>"
CLOSE = "</tool_call>"
MAX_PARALLEL_CALLS = 4  # under "required" with parallel calls, the grammar allows 1..4 calls
MAX_TOOLS = 128
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_ANY_ARGUMENTS = {"type": "object"}


def call_prefix(name: str) -> str:
    return f'{OPEN}{{"name": {json.dumps(name)}, "arguments": '


CALL_SUFFIX = "}" + CLOSE


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """What a request's tools mean for generation."""

    tools: tuple[ToolSpec, ...]
    choice: str  # "none", "auto", "required" or "named"
    named: str | None
    parallel: bool

    @property
    def parses_calls(self) -> bool:
        return bool(self.tools) and self.choice != "none"

    def parameters(self, tool: ToolSpec) -> dict[str, Any]:
        return tool.parameters or _ANY_ARGUMENTS


def tool_dict(tool: ToolSpec) -> dict[str, Any]:
    """A tool as chat templates take it (OpenAI's shape), for templates that render tools themselves."""
    function = {k: v for k, v in (("name", tool.name), ("description", tool.description),
                                   ("parameters", tool.parameters), ("strict", tool.strict)) if v is not None}
    return {"type": "function", "function": function}


def plan_tools(request: GenerationRequest) -> ToolPlan:
    """Validate `tools` / `tool_choice` / `parallel_tool_calls` together (400s name the param)."""
    tools = tuple(request.tools)
    if len(tools) > MAX_TOOLS:
        raise invalid_request(f"At most {MAX_TOOLS} tools are allowed.", "tools", "invalid_value")
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        name = tool.name
        if not _NAME.match(name):
            raise invalid_request(f"Invalid tool name '{name}': use 1-64 letters, digits, '_' or '-'.",
                                  f"tools[{i}].function.name", "invalid_value")
        if name in seen:
            raise invalid_request(f"Tool '{name}' is defined twice.", f"tools[{i}].function.name", "invalid_value")
        seen.add(name)
        params = tool.parameters
        if params is not None and params.get("type", "object") != "object":
            raise invalid_request("Tool parameters must be a JSON schema of type 'object'.",
                                  f"tools[{i}].function.parameters", "invalid_value")
    choice = request.tool_choice
    named = None
    if choice is None:
        mode = "auto" if tools else "none"
    else:
        mode, named = choice.mode, choice.name
    if mode in ("required", "named", "auto") and not tools and choice is not None:
        raise invalid_request("'tool_choice' needs 'tools'.", "tool_choice", "invalid_value")
    if named is not None and named not in seen:
        raise invalid_request(f"tool_choice names '{named}', which is not in 'tools'.", "tool_choice",
                              "invalid_value")
    parallel = request.parallel_tool_calls is not False
    return ToolPlan(tools, mode, named, parallel)


def tools_system_prompt(plan: ToolPlan) -> str:
    """The tool list and the call format, for templates that do not render tools themselves."""
    lines = [
        "You can call functions. To call one, reply with exactly one line per call:",
        f'{OPEN}{{"name": "<function name>", "arguments": <arguments as a JSON object>}}{CLOSE}',
        "Available functions:",
    ]
    for tool in plan.tools:
        spec = {"name": tool.name, "description": tool.description or "",
                "parameters": plan.parameters(tool)}
        lines.append(json.dumps(spec, ensure_ascii=False))
    if plan.choice == "required":
        lines.append("You must call at least one function.")
    elif plan.choice == "named":
        lines.append(f"You must call the function {plan.named}.")
    elif plan.choice == "none":
        lines.append("Do not call any function now; answer in text.")
    if not plan.parallel:
        lines.append("Call at most one function.")
    return "\n".join(lines)


def with_tools_in_system_prompt(messages: list[dict[str, Any]], plan: ToolPlan) -> list[dict[str, Any]]:
    block = tools_system_prompt(plan)
    if messages and messages[0]["role"] in ("system", "developer"):
        first = dict(messages[0])
        first["content"] = f"{first['content']}\n\n{block}" if first["content"] else block
        return [first, *messages[1:]]
    return [{"role": "system", "content": block}, *messages]


# -- parsing -------------------------------------------------------------------------------------------
ParsedCall = ToolCall  # a call parsed out of generated text (the parsers' name for it)


new_call_id = call_id


class ToolCallParser:
    """Splits one choice's text stream into content and complete tool calls.

    Text that could be the start of `<tool_call>` is held back until it is
    either a call (then it never reaches `content`) or plain text.
    """

    def __init__(self, tool_names: Sequence[str], max_calls: int | None = None) -> None:
        self.names = set(tool_names)
        self.max_calls = max_calls  # parallel_tool_calls=false: calls after the first are dropped
        self.calls: list[ParsedCall] = []
        self._buffer = ""
        self._in_call = False
        self.drop_malformed = False  # a call that does not parse is dropped, not returned as text
        self.dropped_blocks = 0

    def feed(self, text: str) -> tuple[str, list[ParsedCall]]:
        self._buffer += text
        content, calls = "", []
        while True:
            if self._in_call:
                end = self._buffer.find(CLOSE)
                if end < 0:
                    break
                body, self._buffer = self._buffer[:end], self._buffer[end + len(CLOSE):]
                self._in_call = False
                call = self._parse(body)
                if call is None and self.drop_malformed:
                    self.dropped_blocks += 1
                elif call is None:
                    content += OPEN + body + CLOSE
                elif self.max_calls is None or len(self.calls) <= self.max_calls:
                    calls.append(call)
                else:
                    self.calls.pop()
            else:
                if self.calls:
                    # Between and after calls, bare newlines are separators, not content.
                    self._buffer = self._buffer.lstrip("\n")
                    if not self._buffer:
                        break
                start = self._buffer.find(OPEN)
                if start < 0:
                    hold = _partial_suffix(self._buffer, OPEN)
                    content += self._buffer[: len(self._buffer) - hold]
                    self._buffer = self._buffer[len(self._buffer) - hold:]
                    break
                content += self._buffer[:start]
                self._buffer = self._buffer[start + len(OPEN):]
                self._in_call = True
        return content, calls

    def finish(self, *, drop_unfinished: bool = False) -> str:
        """Whatever is left: an unfinished call is returned as text (dropped with `drop_unfinished`)."""
        rest = "" if self._in_call and drop_unfinished else (OPEN if self._in_call else "") + self._buffer
        self._buffer, self._in_call = "", False
        return rest

    def _parse(self, body: str) -> ParsedCall | None:
        try:
            data = json.loads(body)
        except ValueError:
            return None
        if not isinstance(data, dict) or data.get("name") not in self.names:
            return None
        arguments = data.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return None
        if not isinstance(arguments, dict):
            return None
        call = ParsedCall(new_call_id(), data["name"], json.dumps(arguments, ensure_ascii=False))
        self.calls.append(call)
        return call


def _partial_suffix(text: str, marker: str) -> int:
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0
