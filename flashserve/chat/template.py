"""Chat templates: OpenAI-style messages -> the prompt text a checkpoint was trained on.

This module owns rendering a checkpoint's Jinja chat template the way Hugging Face
`apply_chat_template` does (sandboxed, `trim_blocks`/`lstrip_blocks`, `raise_exception` and
`strftime_now` globals, a `tojson` that keeps non-ASCII), plus the message clean-up that lets any
template accept what the API layer hands it.

Security: the template source only ever comes from the checkpoint (GGUF `tokenizer.chat_template`,
the HF folder's `chat_template`), never from a request. It is still run in jinja2's
`ImmutableSandboxedEnvironment`, so a hostile checkpoint cannot reach Python internals
(`''.__class__.__mro__` ...) or mutate the messages it is given.

Message rules (applied on a copy; the caller's list is never modified):
- `content=None` becomes `""` (assistant turns that only called tools).
- `developer` becomes `system` when the template source never mentions "developer".
- When the template source never mentions "tool_calls", an assistant's tool calls are appended to its
  content, one per line, as `<tool_call>{"name": ..., "arguments": ...}</tool_call>` (the Hermes /
  Qwen convention that small models have seen most), so the model sees what it called earlier.
- When the template does handle `tool_calls`, string `arguments` holding a JSON object are parsed
  into a dict, because HF templates expect a mapping (`arguments | tojson`), while OpenAI sends a string.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, NoReturn, Protocol

import jinja2
from jinja2 import nodes
from jinja2.exceptions import SecurityError
from jinja2.ext import Extension, loopcontrols
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

# ChatML, for checkpoints that ship no template (the format SmolLM2 and Qwen use).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"


class TemplateError(Exception):
    """The chat template could not be compiled or rendered for these messages."""


class _HasChatTemplate(Protocol):
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}`: HF's assistant-mask marker; here it just renders its body."""

    tags = {"generation"}

    def parse(self, parser: Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    @staticmethod
    def _render_body(caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> NoReturn:
    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # jinja's built-in tojson escapes HTML characters and non-ASCII; HF's does neither.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


class _TemplateDict:
    """`dict(...)` for templates, without exposing the `dict` type itself (no type-hackery through it)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(Namespace):
    """jinja's `namespace()`, refusing underscore-prefixed names (the route to CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        # No named `self`, like jinja's Namespace, so `namespace(self=...)` still works in templates.
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check(name)
        Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(
                f"chat templates cannot set underscore-prefixed namespace attributes ({name!r})"
            )


def _environment() -> ImmutableSandboxedEnvironment:
    # The same environment as transformers' apply_chat_template, so templates render identically.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


def format_tool_calls(tool_calls: Sequence[Mapping[str, Any]]) -> str:
    """Tool calls as text lines for templates that do not render `tool_calls` themselves."""
    lines = []
    for call in tool_calls:
        function = call.get("function") or {}
        payload = {"name": function.get("name"), "arguments": _parse_arguments(function.get("arguments"))}
        lines.append(f"{TOOL_CALL_OPEN}{json.dumps(payload, ensure_ascii=False)}{TOOL_CALL_CLOSE}")
    return "\n".join(lines)


def _parse_arguments(arguments: Any) -> Any:
    """OpenAI sends arguments as a JSON string; a JSON object inside becomes a dict, anything else stays."""
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments)
        except ValueError:
            return arguments
        return parsed if isinstance(parsed, dict) else arguments
    return arguments


class ChatTemplate:
    """A compiled chat template; render many times, from any thread."""

    def __init__(self, source: str, bos_token: str | None = None, eos_token: str | None = None) -> None:
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        # Decided once from the source text, as HF-style servers do: a template that never names these
        # cannot render them, so we adapt the messages instead.
        self.handles_developer = "developer" in source
        self.handles_tool_calls = "tool_calls" in source
        self.handles_tools = "tools" in source.replace("tool_calls", "")
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateError as e:
            raise TemplateError(f"chat template does not compile: {e}") from e

    @classmethod
    def from_checkpoint(cls, checkpoint: _HasChatTemplate) -> ChatTemplate:
        """The checkpoint's own template, or ChatML when it ships none."""
        return cls(checkpoint.chat_template or CHATML_TEMPLATE, checkpoint.bos_token, checkpoint.eos_token)

    def raw_prompt(self, text: str) -> str:
        """A legacy completion's prompt: the text as is (no template; the checkpoint's template decides
        nothing here, and a Jinja chat template has no notion of a bare prompt)."""
        return text

    def fim_prompt(self, prefix: str, suffix: str) -> str | None:
        """Fill in the middle: no format is known for a checkpoint's own Jinja template."""
        return None

    def prepare_messages(self, messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """The message rules of the module docstring, on deep copies."""
        prepared: list[dict[str, Any]] = []
        for message in messages:
            m = copy.deepcopy(dict(message))
            if m.get("content") is None:
                m["content"] = ""
            if m.get("role") == "developer" and not self.handles_developer:
                m["role"] = "system"
            tool_calls = m.get("tool_calls")
            if tool_calls:
                if self.handles_tool_calls:
                    for call in tool_calls:
                        function = call.get("function")
                        if isinstance(function, dict) and "arguments" in function:
                            function["arguments"] = _parse_arguments(function["arguments"])
                else:
                    text = format_tool_calls(tool_calls)
                    m["content"] = f"{m['content']}\n{text}" if m["content"] else text
                    del m["tool_calls"]
            prepared.append(m)
        return prepared

    def render(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        *,
        tools: list[dict[str, Any]] | None = None,
        **extra: Any,
    ) -> str:
        """The prompt text for `messages` (and `tools`, for templates that render them).

        `extra` is passed to the template as variables (e.g. `enable_thinking`); it comes from server
        code, never verbatim from a request.
        """
        # The variables transformers' apply_chat_template passes (tools/documents present even when None,
        # since templates test `tools is not none` as often as `tools is defined`).
        context = {
            **extra,
            "messages": self.prepare_messages(messages),
            "tools": copy.deepcopy(tools),
            "documents": None,
            "add_generation_prompt": add_generation_prompt,
            "bos_token": self.bos_token or "",
            "eos_token": self.eos_token or "",
        }
        try:
            return self._template.render(**context)
        except TemplateError:
            raise
        except jinja2.TemplateError as e:  # includes SecurityError and UndefinedError
            raise TemplateError(f"chat template failed: {e}") from e
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError) as e:
            # Templates do things like `'x' + message['content']`; a message shape they do not expect
            # surfaces as a Python error, which is still the template's error, not the server's.
            raise TemplateError(f"chat template failed: {type(e).__name__}: {e}") from e
