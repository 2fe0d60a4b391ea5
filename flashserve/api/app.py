"""The FastAPI application: routes, error handlers, and the lifespan that
closes every backend (draining the engine thread) on shutdown.

`create_app` takes fully built parts (catalog, key verifier) so tests can
assemble an app around fake backends without loading a model.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request

from flashserve import __version__
from flashserve.accounts.keys import StaticKeyVerifier
from flashserve.api import chat, models
from flashserve.api.errors import install_error_handlers
from flashserve.catalog import Catalog


def create_app(catalog: Catalog, keys: StaticKeyVerifier) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        for backend in catalog.backends():
            await backend.close()

    app = FastAPI(title="flashserve", version=__version__, lifespan=lifespan)
    app.state.catalog = catalog
    app.state.keys = keys
    install_error_handlers(app)
    app.include_router(chat.router)
    app.include_router(models.router)

    @app.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        return {"status": "ok", "models": [c.id for c in request.app.state.catalog.cards()]}

    return app
