"""The internal generation request and the stream of typed deltas: what every backend takes and gives.

Every API surface (OpenAI chat completions today; Anthropic Messages, Responses and legacy completions
next) translates its wire format into one `GenerationRequest` and renders the `ChoiceDelta`s and `Usage`
of a `Generation` back into its own format. Backends (`backends/local.py`, `remote.py`, `router.py`) and
the chat machinery (`chat/tools.py`, `chat/structured.py`) see only these types, never a surface's schema.

It lives at the package's top level, beside `errors.py`, because `api/`, `backends/` and `chat/` all
import it and it imports none of them (only the standard library).

Room left for the surfaces to come, without building them:
- Anthropic: `sampling.top_k`, `sampling.stop` (its stop_sequences), `ToolChoice` "required" (its "any"),
  "none" and "named" (its {"type": "tool"}), `reasoning.thinking` + `reasoning.budget_tokens`.
- Responses: `response_format` (its text.format json_schema), `cache_key` (prompt_cache_key: routing
  affinity), `user`.
- Legacy completions (`api/completions.py`): `raw_prompt` (a prompt string sent as is, no chat template)
  and `suffix` (fill in the middle: the local backend renders the model family's FIM format, a remote one
  forwards both to its upstream's /completions).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

Role = Literal["system", "developer", "user", "assistant", "tool"]


@dataclass(slots=True)
class ToolCall:
    """One function call: in an assistant message of the conversation, or parsed out of generated text."""

    id: str
    name: str
    arguments: str  # a JSON object, as OpenAI sends it: a string


@dataclass(frozen=True, slots=True)
class Message:
    role: Role
    content: str | None = None  # the text (a surface's text parts joined); None: an assistant's calls only
    reasoning_content: str | None = None  # earlier thinking, for templates that show it
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None  # a tool result answers this call
    name: str | None = None
    prefix: bool = False  # the last (assistant) message is a prefix the answer continues


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A function the model may call; `parameters` is a JSON schema of type object (None: any object)."""

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


@dataclass(frozen=True, slots=True)
class ToolChoice:
    mode: Literal["none", "auto", "required", "named"]
    name: str | None = None  # the function, for "named"


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    type: Literal["text", "json_object", "json_schema"]
    schema: dict[str, Any] | None = None  # json_schema: the schema (None is refused where it matters)
    name: str | None = None
    description: str | None = None
    strict: bool | None = None


@dataclass(slots=True)
class Sampling:
    """How tokens are drawn and when generation stops. None: not given (the backend's default applies; a
    pass-through upstream does not receive the field)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None  # the completion budget (OpenAI's max_completion_tokens or max_tokens)
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None  # token id (as a string, as clients send it) -> bias
    n: int = 1  # choices
    logprobs: bool | None = None
    top_logprobs: int | None = None


@dataclass(frozen=True, slots=True)
class Reasoning:
    effort: str | None = None  # none, minimal, low, medium, high, xhigh, max, ultra (chat/reasoning.py maps it)
    thinking: bool | None = None  # an explicit on/off switch; None: from the effort and the model's default
    budget_tokens: int | None = None  # most thinking tokens (None: the effort mode's budget)


@dataclass(slots=True)
class GenerationRequest:
    model: str
    messages: list[Message]
    tools: tuple[ToolSpec, ...] = ()
    tool_choice: ToolChoice | None = None  # None: "auto" with tools, "none" without
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    sampling: Sampling = field(default_factory=Sampling)
    reasoning: Reasoning = field(default_factory=Reasoning)
    stream: bool = False  # whether the client streams (every backend streams; an upstream may care)
    user: str | None = None  # the end user, for limits and an upstream's abuse checks
    cache_key: str | None = None  # routing affinity beyond the conversation's prefix (Responses' prompt_cache_key)
    raw_prompt: str | None = None  # legacy completions: the prompt text itself, no template (messages empty)
    suffix: str | None = None  # legacy completions: fill in the middle, before this text
    modalities: tuple[str, ...] | None = None  # output modalities asked for
    audio: dict[str, Any] | None = None  # audio output parameters
    # Surface fields without meaning here that an OpenAI-compatible upstream receives as they came
    # (store, metadata, service_tier).
    passthrough: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RequestContext:
    request_id: str  # the object's id (chatcmpl-…, msg_…, resp_…): server-generated, never the client's
    tenant: str = ""  # namespaces the prefix cache: the account, narrowed by a router's salt
    # The HTTP request's correlation id (`x-request-id`: the client's when well-formed, else a UUID),
    # forwarded upstream in the form each upstream kind accepts (backends/remote.py: request_headers).
    trace_id: str = ""
    # The tenant as an opaque keyed hash (server_key.py, purpose "cache-salt"): what a flashserve worker
    # receives to namespace its prefix cache, so no account id ever leaves the gateway.
    cache_salt: str = ""


@dataclass(frozen=True, slots=True)
class TopLogprob:
    token: str
    logprob: float
    bytes: tuple[int, ...]  # the token's UTF-8 bytes (a token may hold part of a character)


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A sampled content token's raw log-probability (log-softmax of the logits before temperature,
    penalties, bias and grammar masks) and the `top` most likely alternatives, most likely first."""

    token: str
    logprob: float
    bytes: tuple[int, ...]
    top: tuple[TopLogprob, ...] = ()


@dataclass(slots=True)
class ChoiceDelta:
    index: int
    content: str = ""
    reasoning_content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)  # complete calls, in order
    finish_reason: str | None = None  # set on a choice's last delta
    stop_sequence: str | None = None  # the stop string that ended the choice (finish_reason "stop"), if one did
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per content token in `content`, when asked


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class Generation(Protocol):
    """One request's output: deltas of every choice in arrival order, the usage so far, and an abort."""

    usage: Usage

    def __aiter__(self) -> AsyncIterator[ChoiceDelta]: ...

    async def abort(self) -> None:
        """Stop generating and release resources; idempotent and awaited."""


# A router in front (backends/router.py) passes its tenant to a worker in this header: it can only narrow
# the namespace of the account's prefix cache, never reach another account's.
CACHE_SALT_HEADER = "x-flashserve-cache-salt"
