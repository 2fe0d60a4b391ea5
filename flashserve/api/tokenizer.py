"""POST /tokenize and /detokenize (also under /v1): the model's tokenizer, in vLLM's and SGLang's shapes.

- tokenize `{model, prompt}` (the text as a legacy completion's prompt, no chat template) or
  `{model, messages, add_generation_prompt}` (rendered with the chat template, as a chat request would
  be; `tools` too) -> `{tokens, count, max_model_len}`;
- detokenize `{model, tokens}` -> `{prompt}`.

Authenticated and free: each request takes a slot of the key's requests per minute (429 past them) and
writes no usage row (`api/core.py: admit_free`). The local engine answers exactly; a vLLM or SGLang
upstream (or another flashserve) answers from its own `/tokenize`; DeepSeek's API, or an upstream whose
`/tokenize` is a 404, has no tokenizer to ask: 501.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, model_validator

from flashserve.accounts.keys import Principal
from flashserve.api.auth import require_api_key
from flashserve.api.chat import check_content_parts, check_messages, message_of, reasoning
from flashserve.api.core import admit_free, resolve_model
from flashserve.api.schemas import MAX_MESSAGES, ChatMessage, ReasoningEffort, ThinkingSwitch, Tool
from flashserve.generation import GenerationRequest, ToolSpec

router = APIRouter()


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    model: str = Field(min_length=1)
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool | None = None  # vLLM's; the chat template (or the family's BOS) decides here
    tools: list[Tool] | None = None
    reasoning_effort: ReasoningEffort | None = None
    thinking: ThinkingSwitch | None = None

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either 'prompt' or 'messages'")
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    model: str = Field(min_length=1)
    tokens: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=1 << 20)]


@router.post("/tokenize")
@router.post("/v1/tokenize", include_in_schema=False)
async def tokenize(body: TokenizeRequest, request: Request,
                   principal: Annotated[Principal, Depends(require_api_key)]) -> dict[str, Any]:
    check_messages(body.messages or [])
    gen = GenerationRequest(model=body.model, messages=[message_of(m) for m in body.messages or ()],
                            raw_prompt=body.prompt,
                            tools=tuple(ToolSpec(t.function.name, t.function.description, t.function.parameters,
                                                 t.function.strict) for t in body.tools or ()),
                            reasoning=reasoning(body.reasoning_effort, body.thinking))
    card, backend = resolve_model(request, gen)
    check_content_parts(body.messages or [], card)
    await admit_free(request, principal)
    tokens = await backend.tokenize(gen, body.add_generation_prompt)
    return {"tokens": tokens, "count": len(tokens), "max_model_len": backend.max_model_len}


@router.post("/detokenize")
@router.post("/v1/detokenize", include_in_schema=False)
async def detokenize(body: DetokenizeRequest, request: Request,
                     principal: Annotated[Principal, Depends(require_api_key)]) -> dict[str, Any]:
    _, backend = resolve_model(request, GenerationRequest(model=body.model, messages=[]))
    await admit_free(request, principal)
    return {"prompt": await backend.detokenize(body.tokens)}

