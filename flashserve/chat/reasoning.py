"""Reasoning efforts: whether a request thinks, for how many tokens at most,
and splitting the thinking text out of the answer.

The mapping is DeepSeek's own: `none` turns thinking off; `low`, `medium`
and `high` mean "high"; `xhigh` and `max` mean "max", and so does `ultra`
(the top effort LiteLLM's `deepseek` provider and Codex send). Without an effort the
model card's default applies. A model that cannot think accepts any effort
and simply answers. Thinking text runs until the end-of-thinking marker; it
goes to `reasoning_content` and never into `content`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

THINK_START = "<think>"
THINK_END = "</think>"
EFFORT_MODE = {"none": None, "minimal": "high", "low": "high", "medium": "high", "high": "high",
               "xhigh": "max", "max": "max", "ultra": "max"}


@dataclass(frozen=True, slots=True)
class ReasoningSpec:
    """What a model card says about thinking."""

    can_think: bool = False
    thinks_by_default: bool = False
    budgets: dict[str, int] = field(default_factory=lambda: {"high": 8192, "max": 32768})  # tokens per mode


@dataclass(frozen=True, slots=True)
class Thinking:
    enabled: bool
    mode: str | None = None  # "high" or "max"
    budget: int | None = None  # most thinking tokens before the end marker is forced


def resolve_thinking(effort: str | None, spec: ReasoningSpec) -> Thinking:
    if not spec.can_think:
        return Thinking(False)
    default = "high" if spec.thinks_by_default else None
    mode = default if effort is None else EFFORT_MODE[effort]
    if mode is None:
        return Thinking(False)
    return Thinking(True, mode, spec.budgets.get(mode))


class ReasoningSplitter:
    """Splits one choice's text stream into (reasoning, content) deltas.

    A thinking request starts inside the thinking block (the prompt opened
    it); a leading `<think>` the model writes itself is dropped. Text that
    could be the start of `</think>` is held back until it proves otherwise.
    The line breaks right after `</think>` are dropped, also those that come
    in later pieces than the marker itself.
    """

    def __init__(self, thinking: bool) -> None:
        self.thinking = thinking
        self._buffer = ""
        self._started = False
        self._after_end = False  # thinking ended and no answer text has come yet

    def feed(self, text: str) -> tuple[str, str]:
        if not self.thinking:
            if self._after_end:
                text = text.lstrip("\n")
                self._after_end = not text
            return "", text
        self._buffer += text
        if not self._started:
            stripped = self._buffer.lstrip()
            if THINK_START.startswith(stripped) and len(stripped) < len(THINK_START):
                return "", ""  # might still become "<think>"
            if stripped.startswith(THINK_START):
                self._buffer = stripped[len(THINK_START):]
            self._started = True
        end = self._buffer.find(THINK_END)
        if end >= 0:
            reasoning, content = self._buffer[:end], self._buffer[end + len(THINK_END):].lstrip("\n")
            self._buffer, self.thinking, self._after_end = "", False, not content
            return reasoning, content
        hold = next((k for k in range(min(len(THINK_END) - 1, len(self._buffer)), 0, -1)
                     if THINK_END.startswith(self._buffer[-k:])), 0)
        reasoning = self._buffer[: len(self._buffer) - hold]
        self._buffer = self._buffer[len(self._buffer) - hold:]
        return reasoning, ""

    def finish(self) -> tuple[str, str]:
        rest, self._buffer = self._buffer, ""
        return (rest, "") if self.thinking else ("", rest)


class ThinkMarkerFilter:
    """Drops `<think>` and `</think>` from a thinking model's answer text.

    For such a model (DeepSeek-V4) the markers are its format's control tokens, not text: a marker in the
    answer is one the model wrote where it means nothing (a stray `</think>` in chat mode, whose prompt
    already closed the thinking, or a second one), and it is never shown. Text that could be the start of
    a marker is held back until it proves otherwise.
    """

    MARKERS = (THINK_START, THINK_END)

    def __init__(self) -> None:
        self._buffer = ""

    def feed(self, text: str) -> str:
        buffer = self._buffer + text
        for marker in self.MARKERS:
            buffer = buffer.replace(marker, "")
        hold = next((k for k in range(min(len(THINK_END) - 1, len(buffer)), 0, -1)
                     if any(m.startswith(buffer[-k:]) for m in self.MARKERS)), 0)
        self._buffer = buffer[len(buffer) - hold:]
        return buffer[: len(buffer) - hold]

    def finish(self) -> str:
        rest, self._buffer = self._buffer, ""
        return rest
