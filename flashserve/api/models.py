"""GET /v1/models and /v1/models/{id} (also at the root, DeepSeek's base URL): the catalog as OpenAI model
objects, aliases included as entries of their own that name their target (`alias_of`)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from flashserve.api.auth import require_api_key
from flashserve.api.state import app_state

router = APIRouter(dependencies=[Depends(require_api_key)])


@router.get("/v1/models")
@router.get("/models", include_in_schema=False)
async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": app_state(request).catalog.models()}


@router.get("/v1/models/{model_id:path}")
@router.get("/models/{model_id:path}", include_in_schema=False)
async def retrieve_model(model_id: str, request: Request) -> dict[str, Any]:
    return app_state(request).catalog.model_object(model_id)
