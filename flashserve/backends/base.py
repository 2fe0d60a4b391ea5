"""The seam between the API and whatever generates tokens.

A `Backend` takes a `generation.py: GenerationRequest` and returns a `Generation`: an async stream of
per-choice deltas, a final `Usage`, and an awaited `abort()`. The local engine, a remote
OpenAI-compatible upstream, and a router over replicas all implement every member below (trivially
where one means nothing to them), so the API layer never knows which one it talks to and never probes.
"""

from __future__ import annotations

from typing import Protocol

from flashserve.generation import Generation, GenerationRequest, RequestContext


class Backend(Protocol):
    name: str
    system_fingerprint: str

    async def open(self, request: GenerationRequest, ctx: RequestContext) -> Generation:
        """Validate against the model (context, vocabulary) and start generating.

        Raises `FlashserveError` for a request this backend cannot serve; nothing
        has been generated (or charged) when it does.
        """
        ...

    async def count_tokens(self, request: GenerationRequest) -> int:
        """The prompt tokens `open` would send the model for this request (Anthropic's count_tokens):
        exact for the local engine, a documented estimate where the tokenizer is not ours."""
        ...

    async def tokenize(self, request: GenerationRequest, add_generation_prompt: bool = True) -> list[int]:
        """The prompt's token ids as `open` would send them (POST /tokenize); a conversation without the
        assistant's opening when `add_generation_prompt` is false. A backend that cannot tokenize (an
        upstream without a tokenizer endpoint) raises a 501 `FlashserveError`."""
        ...

    async def detokenize(self, token_ids: list[int]) -> str:
        """The text of token ids (POST /detokenize); 400 for an id outside the vocabulary."""
        ...

    @property
    def max_model_len(self) -> int | None:
        """The longest sequence the model takes (None: not known here, e.g. behind an upstream)."""
        ...

    @property
    def load(self) -> int:
        """Requests in flight through this backend now (a router balances on it)."""
        ...

    async def abort_all(self) -> int:
        """Abort every request in flight (the server's drain time is up); returns how many."""
        ...

    def stats(self) -> dict[str, object]:
        """Cheap counters, synchronous."""
        ...

    async def inspect(self) -> dict[str, object]:
        """A fuller report for /admin/engine (the engine's block pool and its invariants, replicas)."""
        ...

    async def close(self) -> None: ...
