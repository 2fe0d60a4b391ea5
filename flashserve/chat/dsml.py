"""Streaming parser for DeepSeek-V4 DSML tool calls in generated text.

This module owns reading the model's `<｜DSML｜tool_calls>` blocks back into
OpenAI-style calls while the text is still streaming. Writing those blocks
into prompts belongs to `flashserve.chat.deepseek_v4`, whose constants name
every marker here.

A block is trusted only whole: its calls are returned when its closing tag
arrives and every element in it is well formed. Anything else (an unknown
tool, a duplicate or untyped parameter, a `string="false"` value that is not
JSON, stray text between elements, a block cut off by the end of the
stream) fails closed: the block's text is returned as ordinary text, or, with
`drop_malformed` (what `chat/model_output.py` sets for the answer, so no
markup ever reaches `content`), dropped up to its closing tag, counted in
`dropped_blocks`. Whitespace between elements is tolerated, since nothing is
lost by it.

`DsmlToolCallParser` has the interface of `flashserve.chat.tools.ToolCallParser`
(`feed` -> (content, calls), `finish` -> content) so it can take its place for
V4 models; it also accepts raw UTF-8 bytes, split anywhere.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from flashserve.chat.deepseek_v4 import (
    DSML,
    INVOKE_CLOSE,
    INVOKE_OPEN_HEAD,
    PARAMETER_CLOSE,
    PARAMETER_OPEN_HEAD,
    TOOL_CALLS_CLOSE,
    TOOL_CALLS_OPEN,
    TOOL_CALLS_SEPARATOR,
)
from flashserve.chat.tools import ParsedCall, new_call_id

_NAME_END = '">'
_STRING_FLAG_HEAD = '" string="'
_STRING_FLAG_END = 'true">'
_JSON_FLAG_END = 'false">'
_WHITESPACE = " \t\r\n"
# Far above any real tool or parameter name; bounds how long an unclosed name is waited for.
_MAX_NAME_LENGTH = 256


class DsmlToolCallParser:
    """Splits one choice's text stream into content and complete DSML tool calls.

    Text that could still become the start of a block (including the blank
    line the model writes before one) is held back until it is known either
    way. Once a block opens, nothing of it reaches `content` unless it turns
    out to be malformed.
    """

    def __init__(self, tool_names: Sequence[str], max_calls: int | None = None) -> None:
        self.names = set(tool_names)
        self.max_calls = max_calls  # parallel_tool_calls=false: calls after the first are dropped
        self.calls: list[ParsedCall] = []
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buffer = ""
        self._block: _BlockScan | None = None
        self._separator = ""  # the blank line taken off the content before the open block
        self._after_block = False
        self.drop_malformed = False  # a malformed block is dropped (not text) up to its closing tag
        self.dropped_blocks = 0
        self._skipping = False  # inside a dropped block, waiting for its closing tag

    def feed(self, text: str | bytes) -> tuple[str, list[ParsedCall]]:
        # Appending to a local that holds the only reference lets CPython grow the string in place: a long
        # argument streamed token by token then costs linear, not quadratic, time.
        buffer, self._buffer = self._buffer, ""
        buffer += self._decode(text)
        self._buffer = buffer
        del buffer
        content: list[str] = []
        calls: list[ParsedCall] = []
        while self._step(content, calls):
            pass
        return "".join(content), calls

    def finish(self, *, drop_unfinished: bool = False) -> str:
        """Whatever is left: held-back text, and an unfinished block as the text it was.

        `drop_unfinished`: the stream was cut (`chat/model_output.py`): an unfinished block, and a held-back
        piece of an opening tag (`<｜...`), are dropped with the blank line before them, never content.
        """
        self._buffer += self._decoder.decode(b"", final=True)
        rest = (self._separator if self._block is not None else "") + self._buffer
        if self._skipping or (drop_unfinished and (self._block is not None
                                                   or rest.lstrip(_WHITESPACE).startswith("<" + DSML[:1]))):
            rest = ""
        self._buffer, self._block, self._separator, self._after_block = "", None, "", False
        self._skipping = False
        return rest

    def _decode(self, text: str | bytes) -> str:
        if isinstance(text, bytes):
            return self._decoder.decode(text)
        # A str ends any multi-byte character the bytes left half-finished.
        return self._decoder.decode(b"", final=True) + text

    def _step(self, content: list[str], calls: list[ParsedCall]) -> bool:
        """Advance once; False when the buffer needs more text."""
        if self._skipping:
            return self._step_skipping()
        if self._block is None:
            return self._step_outside(content)
        return self._step_inside(content, calls)

    def _step_outside(self, content: list[str]) -> bool:
        if self._after_block:
            # Line breaks after a block separate it from what follows; they are not content.
            self._buffer = self._buffer.lstrip("\n")
            if not self._buffer:
                return False
            self._after_block = False
        start = self._buffer.find(TOOL_CALLS_OPEN)
        if start < 0:
            held = _held_suffix_length(self._buffer, (TOOL_CALLS_SEPARATOR + TOOL_CALLS_OPEN, TOOL_CALLS_OPEN))
            content.append(self._buffer[: len(self._buffer) - held])
            self._buffer = self._buffer[len(self._buffer) - held:]
            return False
        before = self._buffer[:start]
        self._separator = TOOL_CALLS_SEPARATOR if before.endswith(TOOL_CALLS_SEPARATOR) else ""
        content.append(before[: len(before) - len(self._separator)])
        self._buffer = self._buffer[start:]
        self._block = _BlockScan(self.names, position=len(TOOL_CALLS_OPEN))
        return True

    def _step_inside(self, content: list[str], calls: list[ParsedCall]) -> bool:
        assert self._block is not None
        outcome = self._block.advance(self._buffer)
        if outcome is _Outcome.NEEDS_MORE:
            return False
        if outcome is _Outcome.MALFORMED and self.drop_malformed:
            self.dropped_blocks += 1
            self._buffer = self._buffer[len(TOOL_CALLS_OPEN):]
            self._skipping = True
        elif outcome is _Outcome.MALFORMED:
            # Only the opening tag is given up as text: the rest is scanned again, and may hold a real block.
            content.append(self._separator + TOOL_CALLS_OPEN)
            self._buffer = self._buffer[len(TOOL_CALLS_OPEN):]
        else:
            calls.extend(self._accept(self._block.invokes))
            self._buffer = self._buffer[self._block.position:]
            self._after_block = True
        self._block, self._separator = None, ""
        return True

    def _step_skipping(self) -> bool:
        """Drop a malformed block's text up to its closing tag; a new opening tag before that starts a block
        of its own (a real call may follow a broken one)."""
        close, reopen = self._buffer.find(TOOL_CALLS_CLOSE), self._buffer.find(TOOL_CALLS_OPEN)
        if reopen >= 0 and (close < 0 or reopen < close):
            self._buffer, self._skipping = self._buffer[reopen:], False
            return True
        if close >= 0:
            self._buffer, self._skipping = self._buffer[close + len(TOOL_CALLS_CLOSE):], False
            self._after_block = True
            return True
        held = _held_suffix_length(self._buffer, (TOOL_CALLS_CLOSE, TOOL_CALLS_OPEN))
        self._buffer = self._buffer[len(self._buffer) - held:]
        return False

    def _accept(self, invokes: Sequence[_Invoke]) -> list[ParsedCall]:
        accepted = []
        for invoke in invokes:
            if self.max_calls is not None and len(self.calls) >= self.max_calls:
                break
            call = ParsedCall(new_call_id(), invoke.name, json.dumps(invoke.arguments, ensure_ascii=False))
            self.calls.append(call)
            accepted.append(call)
        return accepted


# -- one block ---------------------------------------------------------------------------------------
class _Outcome(Enum):
    NEEDS_MORE = "needs more"
    MALFORMED = "malformed"
    COMPLETE = "complete"


class _NeedsMore(Exception):
    """The text so far is a valid beginning of the element being read."""


class _Malformed(Exception):
    """The text so far cannot be the beginning of a valid element."""


@dataclass(slots=True)
class _Invoke:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class _CheckedValue:
    """How far the value being streamed is known to be clean, so each feed reads only its new text."""

    start: int = -1
    until: int = -1


@dataclass(slots=True)
class _BlockScan:
    """Reads one block's elements from the text that starts with its opening tag.

    Whole invokes are consumed once; a partly arrived invoke is read again
    from its start on the next call, except for the part of a long value
    already checked, so a call costs about the length of the new text.
    """

    names: set[str]
    position: int
    invokes: list[_Invoke] = field(default_factory=list)
    checked_value: _CheckedValue = field(default_factory=_CheckedValue)

    def advance(self, text: str) -> _Outcome:
        try:
            while True:
                at = _skip_whitespace(text, self.position)
                if _expect_literal(text, at, TOOL_CALLS_CLOSE, alternatives=(INVOKE_OPEN_HEAD,)):
                    if not self.invokes:
                        raise _Malformed("a block without calls")
                    self.position = at + len(TOOL_CALLS_CLOSE)
                    return _Outcome.COMPLETE
                invoke, self.position = self._read_invoke(text, at)
                self.invokes.append(invoke)
        except _NeedsMore:
            return _Outcome.NEEDS_MORE
        except _Malformed:
            return _Outcome.MALFORMED

    def _read_invoke(self, text: str, at: int) -> tuple[_Invoke, int]:
        name, at = _read_attribute(text, at, INVOKE_OPEN_HEAD, _NAME_END)
        if name not in self.names:
            raise _Malformed(f"unknown tool {name!r}")
        invoke = _Invoke(name)
        while True:
            at = _skip_whitespace(text, at)
            if _expect_literal(text, at, INVOKE_CLOSE, alternatives=(PARAMETER_OPEN_HEAD,)):
                return invoke, at + len(INVOKE_CLOSE)
            key, value, at = _read_parameter(text, at, self.checked_value)
            if key in invoke.arguments:
                raise _Malformed(f"parameter {key!r} given twice")
            invoke.arguments[key] = value


def _read_parameter(text: str, at: int, checked: _CheckedValue) -> tuple[str, Any, int]:
    key, at = _read_attribute(text, at, PARAMETER_OPEN_HEAD, _STRING_FLAG_HEAD)
    is_string, at = _read_flag(text, at)
    end = _value_end(text, at, checked)
    raw = text[at:end]
    return key, raw if is_string else _json_value(raw), end + len(PARAMETER_CLOSE)


def _value_end(text: str, start: int, checked: _CheckedValue) -> int:
    """Where the value starting at `start` ends (its closing tag); `_NeedsMore` while it is still arriving."""
    resume = checked.until if checked.start == start else start
    end = text.find(PARAMETER_CLOSE, resume)
    tail = text[max(resume, len(text) - len(PARAMETER_CLOSE)):]
    clean_until = end if end >= 0 else len(text) - _held_suffix_length(tail, (PARAMETER_CLOSE,))
    # A value may hold anything but a DSML tag; one there means the structure broke.
    if text.find(DSML, max(start, resume - len(DSML) + 1), clean_until) >= 0:
        raise _Malformed("a DSML tag inside a parameter value")
    if end < 0:
        checked.start, checked.until = start, clean_until
        raise _NeedsMore
    return end


def _read_attribute(text: str, at: int, head: str, end_mark: str) -> tuple[str, int]:
    """The quoted name after `head` (`<｜DSML｜invoke name="` ...), up to `end_mark`."""
    _require_literal(text, at, head)
    start = at + len(head)
    quote = text.find('"', start, start + _MAX_NAME_LENGTH + 1)
    name = text[start:start + _MAX_NAME_LENGTH + 1] if quote < 0 else text[start:quote]
    if any(c in name for c in "<>\n") or len(name) > _MAX_NAME_LENGTH or (quote >= 0 and not name):
        raise _Malformed("a broken name attribute")
    if quote < 0:
        raise _NeedsMore
    _require_literal(text, quote, end_mark)
    return name, quote + len(end_mark)


def _read_flag(text: str, at: int) -> tuple[bool, int]:
    """The `string="..."` flag's value: True when the parameter's value is a plain string."""
    if _expect_literal(text, at, _STRING_FLAG_END, alternatives=(_JSON_FLAG_END,)):
        return True, at + len(_STRING_FLAG_END)
    return False, at + len(_JSON_FLAG_END)


def _json_value(raw: str) -> Any:
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except ValueError as err:
        raise _Malformed("a string=\"false\" value that is not JSON") from err


def _reject_constant(name: str) -> Any:
    # NaN and Infinity are not JSON, and OpenAI clients could not read the arguments back.
    raise ValueError(f"{name} is not JSON")


def _require_literal(text: str, at: int, literal: str) -> None:
    if not _expect_literal(text, at, literal):
        raise _Malformed(f"expected {literal!r}")


def _expect_literal(text: str, at: int, literal: str, alternatives: tuple[str, ...] = ()) -> bool:
    """Whether `literal` is at `at`.

    False when one of `alternatives` is there instead; `_NeedsMore` when the
    text ends while it could still become `literal` or an alternative;
    `_Malformed` when it can be none of them.
    """
    candidates = (literal, *alternatives)
    arrived = text[at:at + max(map(len, candidates))]
    could_be = False
    for candidate in candidates:
        if arrived.startswith(candidate):
            return candidate == literal
        could_be = could_be or candidate.startswith(arrived)
    if could_be:
        raise _NeedsMore
    raise _Malformed(f"expected {literal!r}")


def _skip_whitespace(text: str, at: int) -> int:
    while at < len(text) and text[at] in _WHITESPACE:
        at += 1
    return at


def _held_suffix_length(text: str, markers: Sequence[str]) -> int:
    """The length of the longest end of `text` that could be the start of one of `markers`."""
    longest = 0
    for marker in markers:
        for length in range(min(len(marker) - 1, len(text)), longest, -1):
            if marker.startswith(text[-length:]):
                longest = length
                break
    return longest
