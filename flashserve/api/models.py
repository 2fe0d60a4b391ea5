"""GET /v1/models and /v1/models/{id}: the catalog as OpenAI model objects."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from flashserve.api.auth import require_api_key
from flashserve.api.state import app_state

router = APIRouter(dependencies=[Depends(require_api_key)])


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [card.to_openai() for card in app_state(request).catalog.cards()]}


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, request: Request) -> dict[str, Any]:
    card, _ = app_state(request).catalog.resolve(model_id)
    return card.to_openai()
