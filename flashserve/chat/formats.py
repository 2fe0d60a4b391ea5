"""A model family's chat pieces, by the names its `ModelFamily` gives them (`models/registry.py`).

The family lives in `models/`, below this layer, so it names its template, tool-call format, grammar
format and reasoning spec; this module owns what the names mean and builds them for one checkpoint
(`chat_format`). A family that reuses these formats needs nothing here; a new format is one entry in
each table it needs (docs/adding-a-model.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from flashserve.chat.deepseek_v4 import THINK_END, DeepseekV4Template
from flashserve.chat.dsml import DsmlToolCallParser
from flashserve.chat.reasoning import ReasoningSpec
from flashserve.chat.template import ChatTemplate
from flashserve.chat.tools import ToolCallParser
from flashserve.models.loading import Checkpoint
from flashserve.models.registry import ModelFamily

Template = ChatTemplate | DeepseekV4Template
ToolParser = type[ToolCallParser] | type[DsmlToolCallParser]

# template name -> the checkpoint's template: its own Jinja template (ChatML when it ships none), or an
# encoder written in Python for a family whose template is not Jinja (DeepSeek-V4).
TEMPLATES: dict[str, Callable[[Checkpoint], Template]] = {
    "checkpoint": ChatTemplate.from_checkpoint,
    "deepseek_v4": lambda _checkpoint: DeepseekV4Template(),
}
# tool-call format -> the parser of the model's streamed calls
TOOL_PARSERS: dict[str, ToolParser] = {"json": ToolCallParser, "dsml": DsmlToolCallParser}
# grammar formats: the call syntaxes `structured.GrammarBackend` can force
GRAMMAR_FORMATS = frozenset({"json", "dsml"})
# reasoning name -> (what the card says about thinking, the text that closes a thinking block)
REASONING: dict[str, tuple[ReasoningSpec, str | None]] = {
    "none": (ReasoningSpec(), None),
    "deepseek_v4": (ReasoningSpec(can_think=True), THINK_END),
}


@dataclass(frozen=True, slots=True)
class ChatFormat:
    template: Template
    tool_format: str
    tool_parser: ToolParser
    grammar_format: str
    reasoning: ReasoningSpec
    think_end_ids: tuple[int, ...]  # the end-of-thinking marker's tokens; empty when the model cannot think


def chat_format(family: ModelFamily, checkpoint: Checkpoint) -> ChatFormat:
    """The family's chat pieces for `checkpoint` (its template and tokenizer)."""
    if family.grammar_format not in GRAMMAR_FORMATS:
        raise ValueError(f"model family {family.name!r}: unknown grammar format {family.grammar_format!r}")
    reasoning, think_end = REASONING[family.reasoning]
    think_end_ids: tuple[int, ...] = ()
    if think_end is not None:
        think_end_ids = tuple(checkpoint.tokenizer.encode(think_end, add_special_tokens=False).ids)
    return ChatFormat(
        template=TEMPLATES[family.template](checkpoint),
        tool_format=family.tool_format,
        tool_parser=TOOL_PARSERS[family.tool_format],
        grammar_format=family.grammar_format,
        reasoning=reasoning,
        think_end_ids=think_end_ids,
    )
