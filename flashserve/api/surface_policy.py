"""One policy, on every surface, for what a client sends that we cannot serve.

- Content that changes the meaning of the conversation (images, documents, audio, files) is refused with a
  400 naming where it was: dropping it silently would answer a question the user did not ask.
- Hosted tools that clients attach by default (Anthropic's server tools; OpenAI's web_search, file_search,
  code_interpreter, image_generation, computer_use, ...) run on the provider's side, which has no such
  service here. They are left out of the prompt and named in the `x-flashserve-dropped-tools` response
  header, so clients that always send them (Codex sends web_search) keep working and can see what happened.

The README's "What we cannot serve" table documents the same lists.
"""

from __future__ import annotations

from collections.abc import Iterable

from flashserve.errors import FlashserveError, invalid_request

DROPPED_TOOLS_HEADER = "x-flashserve-dropped-tools"


def refuse_content(kind: str, param: str) -> FlashserveError:
    """The 400 for a content block or part of a kind no model here reads (image, document, audio, file)."""
    return invalid_request(
        f"Content of type '{kind}' is not supported by this server: the model reads text only. Remove it or "
        "describe it in text.", param, "unsupported_content")


def dropped_tools_headers(names: Iterable[str]) -> dict[str, str]:
    """The response header naming the hosted tools left out of the prompt (none: no header)."""
    unique = list(dict.fromkeys(n for n in names if n))
    return {DROPPED_TOOLS_HEADER: ", ".join(unique)} if unique else {}
