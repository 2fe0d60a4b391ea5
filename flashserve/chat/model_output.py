"""One choice's generated text -> reasoning, content and tool calls: the stage after detokenization.

Both producers of raw model text use this one stage: the local engine (`backends/local.py`, after the
detokenizer and stop strings) and a remote upstream whose `content` is the model's raw text (a catalog
backend with `raw_text = "deepseek_v4"`, `backends/remote.py`). So a DeepSeek-V4 answer reads the same
whichever engine wrote it. The rules (issue 16 §3, what vLLM and SGLang users report lost on V4):

- Thinking runs until `</think>` (`ReasoningSplitter`); the line breaks right after it separate the
  thinking from the answer, also when they arrive in later pieces than the marker.
- Tool calls are parsed out of the answer by the model's parser (DSML for V4). A complete call block the
  model writes *inside* its thinking, before `</think>`, is a real call too: the block becomes a tool call
  and the thinking text around it stays reasoning. A block still unfinished when thinking ends stays
  reasoning text: it was not a call.
- The end of the stream inside an unfinished call block (max_tokens, an abort, an upstream cut): the
  partial markup is dropped, never sent as content, and the finish reason stays what it was (`length` for
  max_tokens), which every client handles; the call was never made. A held-back partial opening tag at
  the end is dropped the same way.
- A malformed call block in the answer (an unknown tool, arguments that do not parse, a block with no
  calls, stray text inside it; possible from a raw upstream, whose output no grammar shaped) is dropped up
  to its closing tag, never sent as content; the finish reason stays what it was. In the thinking it stays
  reasoning text, like an unfinished one. So no markup reaches `content`, whatever the model wrote.
- For a thinking model (`strip_think_markers`: V4 locally, a raw V4 upstream), `<think>` and `</think>`
  are never answer text: one written in the answer (a stray `</think>` in chat mode, whose prompt already
  closed the thinking) is dropped.
- A choice that made calls and stopped by itself finishes with `tool_calls`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from flashserve.chat.dsml import DsmlToolCallParser
from flashserve.chat.reasoning import ReasoningSplitter, ThinkMarkerFilter
from flashserve.chat.tools import ParsedCall


class CallParser(Protocol):
    calls: list[ParsedCall]
    drop_malformed: bool  # a malformed block is dropped instead of returned as text
    dropped_blocks: int

    def feed(self, text: str) -> tuple[str, list[ParsedCall]]: ...

    def finish(self, *, drop_unfinished: bool = False) -> str: ...


class CallParserType(Protocol):
    def __call__(self, tool_names: Sequence[str], max_calls: int | None = None) -> CallParser: ...


# raw text format -> the parser of the calls written in it (the catalog's `raw_text` of a remote backend)
RAW_TEXT_PARSERS: dict[str, CallParserType] = {"deepseek_v4": DsmlToolCallParser}


@dataclass(slots=True)
class TextPieces:
    reasoning: str = ""
    content: str = ""
    calls: list[ParsedCall] = field(default_factory=list)

    def add(self, other: TextPieces) -> None:
        self.reasoning += other.reasoning
        self.content += other.content
        self.calls.extend(other.calls)


class ModelOutputParser:
    """Splits one choice's text stream into reasoning, content and complete tool calls.

    `thinking`: the prompt opened a thinking block. `tool_names`: the tools whose calls are parsed (None:
    no call parsing, the text is content). `max_calls` counts calls made in thinking and after it alike.
    """

    def __init__(self, thinking: bool, tool_names: Sequence[str] | None = None, max_calls: int | None = None,
                 tool_parser: CallParserType = DsmlToolCallParser, strip_think_markers: bool = False) -> None:
        self._splitter = ReasoningSplitter(thinking)
        self._markers = ThinkMarkerFilter() if strip_think_markers else None
        self._thinking = thinking
        self._parser = None if tool_names is None else tool_parser(tool_names, max_calls)
        if self._parser is not None:
            self._parser.drop_malformed = not thinking  # the answer: no markup reaches content

    @property
    def calls(self) -> list[ParsedCall]:
        return [] if self._parser is None else self._parser.calls

    @property
    def dropped_blocks(self) -> int:
        """Malformed call blocks left out of the answer."""
        return 0 if self._parser is None else self._parser.dropped_blocks

    def feed(self, text: str) -> TextPieces:
        reasoning, content = self._splitter.feed(text)
        if self._markers is not None:
            content = self._markers.feed(content)
        return self._route(reasoning, content)

    def finish(self, reason: str | None) -> tuple[TextPieces, str | None]:
        """What is left at the end of the stream, and the finish reason to report for `reason`."""
        reasoning, content = self._splitter.finish()
        if self._markers is not None:
            content = self._markers.feed(content) + self._markers.finish()
        out = self._route(reasoning, content)
        if self._thinking:  # the stream ended in thinking: an unfinished block there is thinking text
            self._thinking = False
            if self._parser is not None:
                out.reasoning += self._parser.finish()
                self._parser.drop_malformed = True
        elif self._parser is not None:
            out.content += self._parser.finish(drop_unfinished=True)
        if self.calls and reason == "stop":
            reason = "tool_calls"
        return out, reason

    def _route(self, reasoning: str, content: str) -> TextPieces:
        out = TextPieces()
        if self._parser is None:
            out.reasoning, out.content = reasoning, content
            return out
        if reasoning:
            out.reasoning, out.calls = self._parser.feed(reasoning)
        if self._thinking and not self._splitter.thinking:  # `</think>` arrived in this piece
            self._thinking = False
            out.reasoning += self._parser.finish()
            self._parser.drop_malformed = True
        if content:
            text, calls = self._parser.feed(content)
            out.content += text
            out.calls.extend(calls)
        return out
