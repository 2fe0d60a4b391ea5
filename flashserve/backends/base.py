"""The seam between the API and whatever generates tokens.

A `Backend` takes a validated chat request and returns a `Generation`: an
async stream of per-choice text deltas, a final `Usage`, and an awaited
`abort()`. The local engine, a remote OpenAI-compatible upstream, and a
router over replicas all implement it, so the API layer never knows which
one it talks to.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from flashserve.api.schemas import ChatCompletionRequest
    from flashserve.chat.tools import ParsedCall


@dataclass(frozen=True, slots=True)
class RequestContext:
    request_id: str
    tenant: str = ""  # namespaces the prefix cache; the account once accounts exist


@dataclass(slots=True)
class ChoiceDelta:
    index: int
    content: str = ""
    reasoning_content: str = ""
    tool_calls: list[ParsedCall] = field(default_factory=list)  # complete calls, in order
    finish_reason: str | None = None  # set on a choice's last delta


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
    usage: Usage

    def __aiter__(self) -> AsyncIterator[ChoiceDelta]: ...

    async def abort(self) -> None:
        """Stop generating and release resources; idempotent and awaited."""


class Backend(Protocol):
    name: str
    system_fingerprint: str

    async def open(self, request: ChatCompletionRequest, ctx: RequestContext) -> Generation:
        """Validate against the model (context, vocabulary) and start generating.

        Raises `OpenAIError` for a request this backend cannot serve; nothing
        has been generated (or charged) when it does.
        """
        ...

    def stats(self) -> dict[str, object]: ...

    async def close(self) -> None: ...
