"""The Responses API request body (`POST /v1/responses`), as pydantic models.

Top-level fields we do not use are accepted and ignored (`client_metadata`, `service_tier`, `truncation`,
`safety_identifier`, `stream_options`, ...): clients such as Codex send many, and OpenAI adds more often.
The fields we use are typed strictly. `input` items and `tools` stay plain JSON objects here and are read
item by item in `api/responses.py`, so an error names the exact item (`input[3].content[0]`) rather than a
union's every member.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from flashserve.api.schemas import ReasoningEffort, Unit


class _Loose(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)


class TextFormat(_Loose):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextConfig(_Loose):
    format: TextFormat | None = None
    verbosity: str | None = None


class ReasoningConfig(_Loose):
    effort: ReasoningEffort | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None  # the older spelling

    @property
    def wants_summary(self) -> bool:
        return (self.summary or self.generate_summary) is not None


class ResponsesRequest(_Loose):
    model: str = Field(min_length=1)
    input: str | list[dict[str, Any]] | None = None
    instructions: str | None = None
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Unit | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    stream: bool | None = False
    store: bool | None = True
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    prompt_cache_key: str | None = None
    include: list[str] | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    background: bool | None = None
    truncation: Literal["auto", "disabled"] | None = None
