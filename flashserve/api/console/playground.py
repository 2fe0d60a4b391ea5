"""The playground: its page, and the chat endpoint its script calls with the session cookie.

`POST /console/api/chat/completions` takes an OpenAI chat completions body and goes through the very
code `/v1/chat/completions` runs (`api/chat.py: serve_chat_completion`, hence `api/core.py`: admission,
limits, billing, streaming), billed to the key the session holds the id of; the browser never holds a
key. It needs the session's CSRF token in `x-csrf-token`. `GET /console/api/requests/{id}` returns one of
the account's usage rows, which is where the playground reads a turn's exact cost.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from starlette.responses import Response

from flashserve.api.chat import serve_chat_completion
from flashserve.api.console.web import Ctx, check_csrf_header, context, need_account, render
from flashserve.api.schemas import ChatCompletionRequest
from flashserve.api.state import app_state
from flashserve.errors import INVALID_REQUEST, FlashserveError, not_found

router = APIRouter(prefix="/console")
Context = Annotated[Ctx, Depends(context)]


@router.get("/playground", include_in_schema=False)
async def playground_page(ctx: Context) -> Response:
    need_account(ctx)
    cards = [card.to_openai() for card in app_state(ctx.request).catalog.cards()]
    return render(ctx, "playground.html", title="Playground", cards=cards,
                  request_model=ctx.request.query_params.get("model", ""))


def _signed_out() -> FlashserveError:
    return FlashserveError(401, "Sign in to the console first (or the key of this session was revoked).",
                           INVALID_REQUEST, None, "not_signed_in")


@router.post("/api/chat/completions", include_in_schema=False, response_model=None)
async def playground_chat(body: ChatCompletionRequest, ctx: Context) -> Response:
    principal = await ctx.principal()
    if principal is None:
        raise _signed_out()
    check_csrf_header(ctx)
    return await serve_chat_completion(body, ctx.request, principal)


@router.get("/api/requests/{request_id}", include_in_schema=False)
async def request_record(request_id: str, ctx: Context) -> dict[str, Any]:
    if ctx.session.account_id is None:
        raise _signed_out()
    row = await app_state(ctx.request).accounts.usage_views.record(ctx.session.account_id, request_id)
    if row is None:
        raise not_found(f"No request '{request_id}' in this account.", "request_not_found")
    return row
