"""Pydantic models of Anthropic's Messages API request (`POST /v1/messages`, `/v1/messages/count_tokens`).

Unknown fields are ignored at every level, as clients (Claude Code above all) add new ones with each
release (`cache_control`, `defer_loading`, `context_management`, ...). A
content block is one model with a `type` and the fields of every known kind; `_check_fields` demands
what its kind needs, so a malformed block is a 400 naming the field. Kinds we cannot serve (image,
document, ...) pass validation and are refused by the adapter with `surface_policy.refuse_content`,
so the message says why.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_STOP_SEQUENCES = 16
MAX_MESSAGES = 100_000  # Anthropic's own bound on one request's messages


class _Loose(BaseModel):
    model_config = ConfigDict(extra="ignore")


# What each block kind must carry (the rest of the fields are optional or not read).
_REQUIRED = {
    "text": ("text",),
    "tool_use": ("id", "name", "input"),
    "tool_result": ("tool_use_id",),
    "thinking": ("thinking",),
    "redacted_thinking": ("data",),
}


class ContentBlock(_Loose):
    type: str
    text: str | None = None
    id: str | None = None
    name: str | None = None
    input: dict[str, Any] | None = None
    tool_use_id: str | None = None
    content: str | list[ContentBlock] | None = None
    is_error: bool | None = None
    thinking: str | None = None
    signature: str | None = None
    data: str | None = None

    @model_validator(mode="after")
    def _check_fields(self) -> ContentBlock:
        for name in _REQUIRED.get(self.type, ()):
            if getattr(self, name) is None:
                raise ValueError(f"a content block of type '{self.type}' needs '{name}'")
        return self


class OutputConfig(_Loose):
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None


class MessageParam(_Loose):
    # "system": Claude Code sends a role-system message inside `messages` (treated as system text).
    role: Literal["user", "assistant", "system"]
    content: str | list[ContentBlock]
    # per-turn control (beta `per-turn-control-2026-07-01`): Claude Code puts one on its system message
    output_config: OutputConfig | None = None


class ToolParam(_Loose):
    name: Annotated[str, Field(min_length=1, max_length=128)]
    type: str | None = None  # absent or "custom": a client tool; anything else: a server tool (dropped)
    description: str | None = None
    input_schema: dict[str, Any] | None = None

    @property
    def is_custom(self) -> bool:
        return self.type in (None, "custom")

    @model_validator(mode="after")
    def _custom_needs_schema(self) -> ToolParam:
        if self.is_custom and self.input_schema is None:
            raise ValueError("a custom tool needs 'input_schema'")
        return self


class ToolChoiceParam(_Loose):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None

    @model_validator(mode="after")
    def _tool_needs_name(self) -> ToolChoiceParam:
        if self.type == "tool" and not self.name:
            raise ValueError("tool_choice of type 'tool' needs 'name'")
        return self


class ThinkingParam(_Loose):
    type: Literal["enabled", "adaptive", "disabled"]
    budget_tokens: Annotated[int, Field(ge=1)] | None = None
    display: Literal["summarized", "omitted"] | None = None

    @model_validator(mode="after")
    def _enabled_needs_budget(self) -> ThinkingParam:
        if self.type == "enabled" and self.budget_tokens is None:
            raise ValueError("thinking of type 'enabled' needs 'budget_tokens'")
        return self


class Metadata(_Loose):
    user_id: Annotated[str, Field(max_length=512)] | None = None


class ContextEdit(_Loose):
    type: str
    keep: Any = None  # "all" or {"type": "thinking_turns", "value": N}


class ContextManagement(_Loose):
    edits: list[ContextEdit] = Field(default_factory=list)


class CountTokensRequest(_Loose):
    """The body of `/v1/messages/count_tokens`: a Messages request without `max_tokens`."""

    model: Annotated[str, Field(min_length=1)]
    messages: Annotated[list[MessageParam], Field(min_length=1, max_length=MAX_MESSAGES)]
    system: str | list[ContentBlock] | None = None
    tools: list[ToolParam] | None = None
    tool_choice: ToolChoiceParam | None = None
    thinking: ThinkingParam | None = None
    output_config: OutputConfig | None = None
    context_management: ContextManagement | None = None


class MessagesRequest(CountTokensRequest):
    max_tokens: Annotated[int, Field(ge=1)]
    stop_sequences: Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_STOP_SEQUENCES)] | None \
        = None
    temperature: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=1)] | None = None
    metadata: Metadata | None = None
    stream: bool | None = None
