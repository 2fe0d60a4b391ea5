"""Pydantic models of the chat completions API: the request body with every
field of the reference schema (types, ranges, defaults), and the response,
chunk and usage objects.

Requests are validated strictly, as OpenAI does: `"0.7"` is not a number and
`1.0` is not an integer. Unknown top-level fields are rejected rather than
silently ignored; unknown fields inside a message are tolerated because
clients echo back assistant messages with extra keys (`refusal`,
`annotations`, `provider_specific_fields`, ...): those describe an earlier
answer and change nothing. Message fields that would change the request's
meaning are declared, so none is silently dropped: `prefix` (DeepSeek's chat
prefix completion) is served; the legacy `function_call` and an assistant's
`audio` are refused (`api/chat.py: check_request`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Role = Literal["system", "developer", "user", "assistant", "tool"]
MAX_STOP_SEQUENCES = 16


def stop_list(stop: str | list[str] | None) -> list[str]:
    """OpenAI's `stop` (a string, a list of them, or nothing) as a list."""
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def check_stop(stops: list[str]) -> None:
    """The bounds every surface that takes `stop` holds it to (raised as a 400 naming `stop`)."""
    if len(stops) > MAX_STOP_SEQUENCES:
        raise ValueError(f"'stop' takes at most {MAX_STOP_SEQUENCES} sequences")
    if any(s == "" for s in stops):
        raise ValueError("'stop' sequences must not be empty")
MAX_N = 16
MAX_MESSAGES = 2048  # OpenAI's own limit on one request's messages
MAX_MESSAGE_CHARS = 4 << 20  # characters of one message's text (its content parts together)


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class InputAudio(_Strict):
    data: str
    format: Literal["wav", "mp3"]


class FileRef(_Strict):
    file_id: str | None = None
    filename: str | None = None
    file_data: str | None = None


class VideoURL(_Strict):
    url: str


class ContentPart(_Strict):
    type: Literal["text", "image_url", "input_audio", "file", "video_url"]
    text: str | None = None
    image_url: ImageURL | None = None
    input_audio: InputAudio | None = None
    file: FileRef | None = None
    video_url: VideoURL | None = None

    @model_validator(mode="after")
    def _text_needs_text(self) -> ContentPart:
        if self.type == "text" and self.text is None:
            raise ValueError("a content part of type 'text' needs a 'text' string")
        return self


class FunctionCall(_Strict):
    name: str
    arguments: str


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    prefix: bool | None = None  # DeepSeek: the last (assistant) message is a prefix the answer continues
    # Declared only to be refused (api/chat.py): each would change the request if it were read.
    function_call: Any = None
    audio: Any = None

    @model_validator(mode="after")
    def _check_role_fields(self) -> ChatMessage:
        text = self.content if isinstance(self.content, str) else "".join(
            getattr(part, "text", None) or "" for part in self.content or ())
        if len(text) > MAX_MESSAGE_CHARS:
            raise ValueError(f"a message's content may hold at most {MAX_MESSAGE_CHARS} characters")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a message with role '{self.role}' needs 'content'")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a message with role 'tool' needs 'tool_call_id'")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only assistant messages may carry 'tool_calls'")
        return self


class StreamOptions(_Strict):
    include_usage: bool | None = None


class FunctionDef(_Strict):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class ToolChoiceFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: ToolChoiceFunction


class JSONSchemaSpec(_Strict):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    # The reference page nests the schema directly; OpenAI wraps it in `json_schema`.
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    json_schema: JSONSchemaSpec | None = None


class ThinkingSwitch(_Strict):
    """DeepSeek's thinking switch. `budget_tokens` (Anthropic's spelling, which some clients add) caps the
    thinking tokens when enabled."""

    type: Literal["enabled", "disabled"]
    budget_tokens: Annotated[int, Field(ge=1)] | None = None


class AudioParams(_Strict):
    format: str
    voice: str


ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max", "ultra"]
Unit = Annotated[float, Field(ge=0, le=1)]
Penalty = Annotated[float, Field(ge=-2, le=2)]


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)

    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    temperature: Annotated[float, Field(ge=0, le=2)] | None = 1.0
    top_p: Unit | None = 1.0
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    presence_penalty: Penalty | None = 0.0
    frequency_penalty: Penalty | None = 0.0
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    user: str | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    seed: Annotated[int, Field(ge=-(2**63), le=2**64 - 1)] | None = None
    reasoning_effort: ReasoningEffort | None = None
    thinking: ThinkingSwitch | None = None
    modalities: list[Literal["text", "audio"]] | None = None
    audio: AudioParams | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] | None = 1
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        check_stop(stop_list(value))  # a field validator, so the 400 names `stop`
        return value

    @property
    def stop_list(self) -> list[str]:
        return stop_list(self.stop)

    @property
    def max_output_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


# -- responses -----------------------------------------------------------------
class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0
    text_tokens: int = 0
    audio_tokens: int = 0
    image_tokens: int = 0


class CompletionTokensDetails(BaseModel):
    text_tokens: int = 0
    audio_tokens: int = 0
    reasoning_tokens: int = 0


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    completion_tokens_details: CompletionTokensDetails


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None


class Choice(BaseModel):
    index: int
    message: ResponseMessage
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: UsageInfo
    system_fingerprint: str


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChunkChoice]
    usage: UsageInfo | None = None
