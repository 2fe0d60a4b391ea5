"""The FastAPI application: routes, error handlers, and the lifespan that opens
the accounts database (migrating it) on start-up and closes every backend
(draining the engine thread) and the database on shutdown.

`create_app` takes fully built parts (catalog, accounts) so tests can
assemble an app around fake backends without loading a model.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request

from flashserve import __version__
from flashserve.accounts.service import Accounts
from flashserve.api import admin, chat, models, usage
from flashserve.api.errors import install_error_handlers
from flashserve.catalog import Catalog


def create_app(catalog: Catalog, accounts: Accounts) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await accounts.start()
        try:
            yield
        finally:
            for backend in catalog.backends():
                await backend.close()
            await accounts.close()

    app = FastAPI(title="flashserve", version=__version__, lifespan=lifespan)
    app.state.catalog = catalog
    app.state.accounts = accounts
    install_error_handlers(app)
    app.include_router(chat.router)
    app.include_router(models.router)
    app.include_router(usage.router)
    app.include_router(admin.router)

    @app.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        return {"status": "ok", "models": [c.id for c in request.app.state.catalog.cards()]}

    return app
